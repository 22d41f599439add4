"""Custom artifact types of the PLACE pipeline (tracked in ML Metadata like the standard ones)."""

from tfx.types.artifact import Artifact


class CorpusReport(Artifact):
    """The corpus gate's verdict: counts of bad examples by reason, per split (no content)."""

    # "<namespace>.<Name>": the form KFP v2 schema titles require.
    TYPE_NAME = "place.CorpusReport"
