"""MIMIC-CXR report section parser: hand-written variants, fuzzing, sentence splitting."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from place_tf.data.reports import DEID_TOKEN, normalize_section, parse_report, split_sentences

MIMIC_STYLE = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with new onset ascites  // eval for infection

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  None.

 FINDINGS:

 There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
 nodular opacities that most likely represent nipple shadows. The
 cardiomediastinal silhouette is normal.

 IMPRESSION:

 No acute cardiopulmonary process.
"""

CASES = [
    (
        "mimic style, upper case with colons",
        MIMIC_STYLE,
        (
            "There is no focal consolidation, pleural effusion or pneumothorax. Bilateral "
            "nodular opacities that most likely represent nipple shadows. The "
            "cardiomediastinal silhouette is normal.",
            "No acute cardiopulmonary process.",
        ),
    ),
    (
        "mixed case headers without colon, alone on their line",
        "Findings\nLungs are clear.\n\nImpression\nNormal chest.\n",
        ("Lungs are clear.", "Normal chest."),
    ),
    (
        "lower case headers with colon, text on the same line",
        "findings: heart size normal.\nimpression: no acute process.",
        ("heart size normal.", "no acute process."),
    ),
    (
        "combined FINDINGS AND IMPRESSION goes to findings only",
        "INDICATION: cough\nFINDINGS AND IMPRESSION:\nNo effusion. Stable cardiomegaly.\n",
        ("No effusion. Stable cardiomegaly.", ""),
    ),
    (
        "combined FINDINGS/IMPRESSION plus a separate impression",
        "FINDINGS/IMPRESSION: Clear lungs.\nIMPRESSION: Normal.",
        ("Clear lungs.", "Normal."),
    ),
    (
        "numbered impression on separate lines, items without periods",
        "IMPRESSION:\n1. Small left effusion\n2. Heart size 3.5 cm larger\n3. No pneumothorax.\n",
        ("", "Small left effusion. Heart size 3.5 cm larger. No pneumothorax."),
    ),
    (
        "numbered impression inline",
        "IMPRESSION: 1. Tube in place. 2) No PTX 3. Effusion.",
        ("", "Tube in place. No PTX. Effusion."),
    ),
    (
        "numbers that are not a list stay",
        "FINDINGS: Fracture of rib 1. Nodule measures 2. 5 cm.",
        ("Fracture of rib 1. Nodule measures 2. 5 cm.", ""),
    ),
    (
        "de-identification blanks become one ___ token",
        "FINDINGS: Compared to ___ and ______, Dr. __ was notified.\n",
        ("Compared to ___ and ___, Dr. ___ was notified.", ""),
    ),
    (
        "inline upper-case IMPRESSION ends the findings",
        "FINDINGS: Lungs clear. IMPRESSION: Normal.",
        ("Lungs clear.", "Normal."),
    ),
    (
        "other sections (WET READ, RECOMMENDATION) end findings/impression",
        "WET READ: ___ 4:27 PM\n  No PTX.\nFINDINGS: Clear.\nRECOMMENDATION(S): CT.\n"
        "IMPRESSION: Normal.\nNOTIFICATION: called ___.",
        ("Clear.", "Normal."),
    ),
    (
        "no findings or impression at all",
        "INDICATION: fever\nCOMPARISON: none\n",
        ("", ""),
    ),
    (
        "CONCLUSION counts as impression; CRLF and tabs normalised",
        "FINDINGS:\r\n\tMild\tatelectasis.\r\nCONCLUSION:\r\n  Mild atelectasis.  ",
        ("Mild atelectasis.", "Mild atelectasis."),
    ),
    (
        "a section given twice is concatenated",
        "FINDINGS: Part one.\nCOMPARISON: x\nFINDINGS: Part two.",
        ("Part one. Part two.", ""),
    ),
    (
        "empty impression section",
        "FINDINGS: Clear.\nIMPRESSION:\n",
        ("Clear.", ""),
    ),
    (
        "word 'impression' inside a sentence is not a header",
        "FINDINGS: The impression of the heart on the\nimpression is unchanged.",
        ("The impression of the heart on the impression is unchanged.", ""),
    ),
]


@pytest.mark.parametrize("name,text,want", CASES, ids=[c[0] for c in CASES])
def test_report_variants(name, text, want):
    assert parse_report(text) == want


def test_deid_token_is_three_underscores():
    assert DEID_TOKEN == "___"
    assert normalize_section("a __ b _____ c _ d") == "a ___ b ___ c _ d"


def test_control_characters_dropped():
    assert normalize_section("Clear\x00 lungs\x1b.\x0cOk") == "Clear lungs. Ok"


@pytest.mark.parametrize("bad", [None, b"FINDINGS: x", 3, ["FINDINGS: x"]])
def test_non_str_raises_type_error(bad):
    with pytest.raises(TypeError, match="expects str"):
        parse_report(bad)


def test_split_sentences():
    text = "No effusion. ___ line at 3.5 cm. Heart normal! Is it? yes."
    assert split_sentences(text) == [
        "No effusion.",
        "___ line at 3.5 cm.",
        "Heart normal!",
        "Is it? yes.",
    ]
    assert split_sentences("   ") == []


_HEADERISH = st.sampled_from(
    [
        "FINDINGS",
        "IMPRESSION",
        "Findings",
        "impression",
        "FINDINGS AND IMPRESSION",
        "WET READ",
        ":",
        "\n",
        " ",
        "1. ",
        "2) ",
        "___",
        "\r\n",
        "\t",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=20), _HEADERISH), max_size=30).map("".join))
def test_fuzz_parse_report_never_raises_and_is_normalised(text):
    findings, impression = parse_report(text)
    for part in (findings, impression):
        assert isinstance(part, str)
        assert part == part.strip()
        assert "\n" not in part and "\t" not in part and "  " not in part
        assert "____" not in part


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_fuzz_split_sentences_never_raises(text):
    parts = split_sentences(text)
    assert all(p and p == p.strip() for p in parts)
