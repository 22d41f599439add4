"""Custom artifact types of the PLACE pipeline (tracked in ML Metadata like the standard ones)."""

from tfx.types.artifact import Artifact


class CorpusReport(Artifact):
    """The corpus gate's verdict: counts of bad examples by reason, per split (no content)."""

    TYPE_NAME = "PlaceCorpusReport"
