"""The TFX environment: TFX 1.21, MLMD and TFDV import, Keras stays 3.x after TFX, and
the TFX runtime (LocalDagRunner + sqlite MLMD) runs a custom component end to end."""

import pytest

pytest.importorskip(
    "tfx", reason="TFX needs glibc >= 2.39: `make test` runs it in the TFX environment"
)
pytestmark = pytest.mark.tfx

from tfx.dsl.component.experimental.annotations import OutputArtifact, Parameter  # noqa: E402
from tfx.dsl.component.experimental.decorators import component  # noqa: E402
from tfx.types.standard_artifacts import String  # noqa: E402


@component
def Hello(word: Parameter[str], out: OutputArtifact[String]):  # noqa: N802
    """A one-step custom component: writes `word` upper-cased into its artifact."""
    out.value = word.upper()


def test_tfx_stack_imports():
    import ml_metadata
    import tensorflow_data_validation as tfdv
    import tfx

    assert tfx.__version__ == "1.21.0"
    assert ml_metadata.__version__.startswith("1.21")
    assert tfdv.__version__.startswith("1.21")


def test_keras_is_keras3_after_tfx_import():
    # tensorflow_transform sets TF_USE_LEGACY_KERAS=1; `import keras` must stay Keras 3.
    import keras
    import tensorflow_transform  # noqa: F401

    assert keras.__version__.startswith("3.")


@pytest.mark.slow
def test_trivial_tfx_pipeline_with_mlmd(tmp_path):
    from tfx import v1 as tfx

    hello = Hello(word="place")
    db = str(tmp_path / "mlmd.sqlite")
    pipeline = tfx.dsl.Pipeline(
        pipeline_name="env-check",
        pipeline_root=str(tmp_path / "root"),
        components=[hello],
        metadata_connection_config=tfx.orchestration.metadata.sqlite_metadata_connection_config(db),
    )
    tfx.orchestration.LocalDagRunner().run(pipeline)

    from ml_metadata.metadata_store import metadata_store
    from ml_metadata.proto import metadata_store_pb2

    cfg = metadata_store_pb2.ConnectionConfig()
    cfg.sqlite.filename_uri = db
    store = metadata_store.MetadataStore(cfg)
    arts = store.get_artifacts_by_type("String")
    assert len(arts) == 1
    # A String artifact's payload is the file at its URI.
    with open(arts[0].uri) as f:
        assert f.read() == "PLACE"
    execs = store.get_executions()
    assert any(e.last_known_state == metadata_store_pb2.Execution.COMPLETE for e in execs)
