"""Report section order: ours (FINDINGS then IMPRESSION) or MGCA's (IMPRESSION first)."""

import pytest
import tensorflow as tf

from place_tf.data.reports import REPORT_ORDERS, join_sections, parse_report

# A report in the MIMIC-CXR free-text layout (mimic-cxr-reports/files/pXX/pXXXXXXXX/sXXXXXXXX.txt).
RAW = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough

 FINDINGS:

 There is a small left pleural effusion.  No pneumothorax.

 IMPRESSION:

 1. Small left effusion.
"""


def test_join_sections_in_both_orders_str_and_tf():
    findings, impression = parse_report(RAW)
    ours = "There is a small left pleural effusion. No pneumothorax. Small left effusion."
    mgca = "Small left effusion. There is a small left pleural effusion. No pneumothorax."
    assert join_sections(findings, impression) == ours
    assert join_sections(findings, impression, "impression_findings") == mgca
    got = join_sections(
        tf.constant([findings, ""]), tf.constant([impression, "Clear."]), "impression_findings"
    )
    assert [t.decode() for t in got.numpy()] == [mgca, "Clear."]
    assert REPORT_ORDERS == ("findings_impression", "impression_findings")


def test_unknown_order_is_an_error_naming_the_choices():
    with pytest.raises(ValueError, match="report order must be one of"):
        join_sections("a", "b", "impression_only")
