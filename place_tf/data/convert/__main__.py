"""`python -m place_tf.data.convert <source> --input DIR --output DIR [options] [beam args]`.

Options the converter does not know are passed to Beam, e.g.
  --runner DataflowRunner --project P --region R --temp_location gs://B/tmp \\
      --sdk_container_image IMAGE     (an image with place_tf, tensorflow, pillow, pydicom)
  --runner FlinkRunner --flink_master HOST:8081 --environment_type DOCKER ...
Remote runners need --input/--output on storage the workers share (gs://, s3://, hdfs://).
Without --runner: DirectRunner, --direct_running_mode=multi_processing,
--direct_num_workers=<all cores>. Exit status 2 for a wrong input layout or arguments.
"""

from __future__ import annotations

import argparse
import logging
import sys

from place_tf.data.convert import SOURCES, converter_class


def build_parser(source: str) -> argparse.ArgumentParser:
    from place_tf.data.convert import beam_skeleton as bs

    cls = converter_class(source)
    parser = argparse.ArgumentParser(
        prog=f"python -m place_tf.data.convert {source}",
        description=sys.modules[cls.__module__].__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--input", required=True, help="the dataset's download folder")
    parser.add_argument("--output", required=True, help="corpus folder to write")
    parser.add_argument(
        "--shards", type=int, default=0, help="train shards (0: follow the data, see below)"
    )
    parser.add_argument("--eval_shards", type=int, default=0, help="validate/test shards")
    parser.add_argument(
        "--target_shard_mb",
        type=float,
        default=bs.TARGET_SHARD_BYTES / 2**20,
        help="without --shards: shards of about this many MiB (estimated from image sizes)",
    )
    parser.add_argument(
        "--examples_per_shard", type=int, default=0, help="without --shards: instead of MiB"
    )
    parser.add_argument(
        "--vocab_size",
        type=int,
        default=bs.DEFAULT_VOCAB_SIZE,
        help="WordPiece vocab.txt learned from the train reports (0: none)",
    )
    parser.add_argument(
        "--splits_from",
        default="",
        help="a peer's split file: FILE.csv (id + split columns) or train=A.csv,validate=B.csv,...",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing corpus")
    parser.add_argument(
        "--no_shard_checksums", action="store_true", help="skip sha256 of the written shards"
    )
    parser.add_argument("--log_level", default="INFO", help="ours; Beam's own logs: WARNING")
    parser.add_argument("--beam_log_level", default="WARNING")
    cls.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SOURCES:
        print(
            "usage: python -m place_tf.data.convert SOURCE --input DIR --output DIR [options]\n"
            f"SOURCE: one of {', '.join(sorted(SOURCES))}; "
            "`... SOURCE --help` lists its options",
            file=sys.stderr,
        )
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    source = argv[0]
    parser = build_parser(source)
    args, beam_args = parser.parse_known_args(argv[1:])
    # force: importing Beam may already have configured the root logger at WARNING (it
    # warns through logging.warning when GCP's apitools is absent, as in the core venv),
    # which would hide the progress and the final counts.
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    # Beam relays every worker log line at INFO; keep our counts readable.
    logging.getLogger("apache_beam").setLevel(str(args.beam_log_level).upper())
    from place_tf.data.convert import beam_skeleton as bs

    try:
        conv = converter_class(source).from_args(args)
    except ValueError as e:  # bad option values
        print(f"place_tf.data.convert {source}: error: {e}", file=sys.stderr)
        return 2
    try:
        bs.run_conversion(
            conv,
            args.output,
            shards=args.shards or None,
            eval_shards=args.eval_shards or None,
            beam_args=beam_args,
            overwrite=args.overwrite,
            checksum_shards=not args.no_shard_checksums,
            target_shard_bytes=int(args.target_shard_mb * 2**20),
            examples_per_shard=args.examples_per_shard,
            vocab_size=args.vocab_size,
            splits_from=args.splits_from,
        )
    except (bs.LayoutError, FileExistsError) as e:
        print(f"place_tf.data.convert {source}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
