"""How far to trust one recognised page: a few cheap checks on the model's output (issue 17).

``assess`` runs once per attempt of each page, in the task's process, and costs about a
millisecond on a full page (0.8-1 ms for 900 words, 6,700 characters, against their layer). It
returns the page's ``PageQuality``: the agreement of its text with
the PDF's own text layer, and the reasons, if any, that make it suspect:

- ``no_end_marker``: the model never reached its end marker (cut by the token cap or the deadline).
- ``repeating_tail``: the output ends in one short unit repeated many times, the runaway loop
  DeepSeek-OCR's users report on up to 9 % of some documents' pages (DeepSeek-OCR issue #151).
  Exact repeats only: a loop that counts ("1. 2. 3. ...") is not one, but it runs into the token
  cap (``no_end_marker``) and disagrees with the text layer.
- ``empty_output``: no words at all, on a page whose text layer or pixels say it has content.
- ``low_agreement``: the text agrees with the text layer less than the operator asked for.
- ``box_outside_page``: a grounding box outside the model's 0-999 page, or with no area.

**The agreement measure.** The recognised text, stripped of markup (HTML tags and entities,
LaTeX commands, Markdown link targets; what is left of markup is punctuation, which is not
compared), is compared with the text layer as two *bags* of tokens, by F1:
``2 * |common| / (|recognised| + |layer|)``, counting a token as often as it occurs in both.
A bag ignores order, on purpose: the model reads a two-column page column by column while a text
layer may run across the columns, or list the blocks in the order the authoring tool wrote them;
any order-bound measure (edit distance, longest common subsequence) would punish a perfect reading.
Tokens are words (Unicode letters and digits, case-folded after NFKC, which also undoes ligatures
and full-width forms) in scripts that put spaces between words; in scripts that do not (Chinese,
Japanese kana, Thai, Lao, Khmer, Myanmar) a run of characters becomes its character bigrams, as
words cannot be found without a dictionary, single characters of a language match by chance far
too often, and bigrams hold most of the signal of a word. Whole words, not character n-grams, for
the other scripts: unrelated English texts share most of their letter bigrams and trigrams, but
few of their words. F1 punishes both losses (a paragraph left out: recall) and inventions (a
repeated or made-up block: precision), and counting occurrences keeps a loop from looking complete.
A text layer of fewer than ``MIN_LAYER_TOKENS`` tokens (a page number stamped on a scan) says too
little to compare with: the agreement is then ``None``, as for images.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from typing import Any

from app.engines.base import END_MARKER, PageText
from app.pipeline.grounding import PAD_MARKER, ParsedPage

REASONS = ("no_end_marker", "repeating_tail", "empty_output", "low_agreement", "box_outside_page")
"""Why a page can be suspect, a bounded set (it labels a metric); ``reasons`` keep this order."""

# How bad each reason is, for ``PageQuality.rank``: powers of two, so the worst reason an attempt
# has decides before any number of lesser ones. Nothing at all is worst; a runaway loop next (its
# text is cut at the loop, but the page after it is lost); then a page cut short; then text that
# disagrees with the PDF; a box off the page spoils one crop, not the text.
_SEVERITY = {
    "empty_output": 16,
    "repeating_tail": 8,
    "no_end_marker": 4,
    "low_agreement": 2,
    "box_outside_page": 1,
}

MIN_LAYER_TOKENS = 20
"""A text layer with fewer tokens than this gives no agreement (``None``): too little to compare."""

_BOX_MAX = 999  # DeepSeek-OCR's boxes are on a 0-999 grid over the page (its grounding prompt)

# The repeating tail. A runaway repeats its unit until the token cap, thousands of characters;
# legitimate text repeats a short unit for at most a line: a dot leader in a table of contents
# (under 150 characters on any page width), a row of underscores for a signature. So the tail
# counts only past ``_TAIL_MIN_CHARS`` characters and ``_TAIL_MIN_REPEATS`` copies of a unit of up
# to ``_TAIL_MAX_PERIOD`` characters (a table row, a short paragraph). A finished table ends with
# its closing tag, so its rows, however alike, are never a tail; only a page cut inside a run of
# identical rows can look like one, and that page is already suspect for having no end marker.
_TAIL_MAX_PERIOD = 500
_TAIL_MIN_REPEATS = 8
_TAIL_MIN_CHARS = 200

# Markup stripped before comparing. Bounded repetitions keep every pattern linear on hostile text.
_HTML_TAG = re.compile(r"</?[A-Za-z][^<>]{0,500}>")
_MD_LINK_TARGET = re.compile(r"\]\([^()\s]{0,2000}\)")  # "[text](url)": the url is not on the page
_LATEX_COMMAND = re.compile(r"\\([A-Za-z]+)")  # \frac, \mathrm: their arguments stay
# fmt: off
_GREEK_NAMES = [
    "alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda",
    "mu", "nu", "xi", "omicron", "pi", "rho", "sigma", "tau", "upsilon", "phi", "chi", "psi", "omega",
]
# fmt: on
# A Greek letter is a letter of the text layer too: \alpha and \Omega read as the PDF's α and Ω.
_GREEK_SMALL = dict(zip(_GREEK_NAMES, "αβγδεζηθικλμνξοπρστυφχψω", strict=True))
_GREEK = (
    _GREEK_SMALL
    | {name.capitalize(): letter.upper() for name, letter in _GREEK_SMALL.items()}
    | {"varepsilon": "ε", "vartheta": "θ", "varphi": "φ", "varpi": "π", "varrho": "ρ", "varsigma": "ς"}
)
# Scripts written without spaces between words; NFKC has already made half-width kana full-width.
_UNSPACED = (
    "\u0e00-\u0eff"  # Thai, Lao
    "\u1000-\u109f"  # Myanmar
    "\u1780-\u17ff"  # Khmer
    "\u3040-\u30ff\u31f0-\u31ff"  # Hiragana, Katakana
    "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # CJK ideographs, extension A, compatibility
    "\U00020000-\U0003134f"  # CJK extensions B-G
)
_UNSPACED_FIRST = "\u0e00"  # no character below this is in _UNSPACED
_UNSPACED_RUN = re.compile(f"[{_UNSPACED}]+")
# A line break inside such a run is where a line of the text layer ended, not a word boundary.
_UNSPACED_BREAK = re.compile(f"(?<=[{_UNSPACED}])\\s+(?=[{_UNSPACED}])")
# A word: letters and digits of any script, with the combining marks that \w leaves out but
# words carry (accents left decomposed, Arabic and Hebrew points, Indic vowel signs; not the
# dandas, U+0964-5, which end sentences).
_MARKS = (
    "\u0300-\u036f\u0483-\u0489\u0591-\u05bd\u05bf-\u05c7\u0610-\u061a\u064b-\u065f\u0670"
    "\u06d6-\u06ed\u0900-\u0963\u0966-\u0dff\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f"
)
_WORD = re.compile(f"[\\w{_MARKS}]+")  # on text whose underscores (in \w) are spaces
# A det the model closed: its complete ``[x0, y0, x1, y1]`` lists (one bare list, or a list of them).
_DET = re.compile(r"<\|det\|>([^<]{0,10000})<\|/det\|>")
_NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"
_BOX = re.compile(rf"\[{_NUMBER},{_NUMBER},{_NUMBER},{_NUMBER}\]")


@dataclass(frozen=True)
class PageQuality:
    """What the checks found on one attempt at one page."""

    text_layer_agreement: float | None  # bag-of-tokens F1 with the text layer, 0-1, 3 places
    reasons: tuple[str, ...]  # a subset of REASONS, in REASONS order; empty for a page to trust

    @property
    def suspect(self) -> bool:
        """Whether anything makes the page suspect."""
        return bool(self.reasons)

    def rank(self) -> tuple[int, float]:
        """A key for keeping the best of several attempts at a page: bigger is better.

        First the reasons, compared from the worst down: the attempt whose worst reason is less
        severe wins (empty output, then a repeating tail, no end marker, low agreement, a box
        outside the page, from worst to least), and where that is the same, the next one decides,
        so an attempt with a subset of another's reasons wins; a finished page beats an unfinished
        one through ``no_end_marker``. Then the higher agreement (an attempt without one, an image,
        ranks as -1, only ever beside others without one). Equal ranks are equally good: the
        caller keeps the earlier attempt.
        """
        severity = sum(_SEVERITY[reason] for reason in self.reasons)
        agreement = -1.0 if self.text_layer_agreement is None else self.text_layer_agreement
        return -severity, agreement

    def as_json(self, *, attempts: int, rung: int) -> dict[str, Any]:
        """The page's ``quality`` object in ``result.json``: this attempt's findings, how many
        attempts the page had and which rung of the retry ladder this one was (0: the first)."""
        return {
            "text_layer_agreement": self.text_layer_agreement,
            "suspect": self.suspect,
            "reasons": list(self.reasons),
            "attempts": attempts,
            "rung": rung,
        }


def assess(
    text: PageText, parsed: ParsedPage, *, text_layer: str | None, has_ink: bool, min_agreement: float
) -> PageQuality:
    """Check one attempt at a page.

    ``text`` is the engine's raw output and ``parsed`` what ``grounding.parse_page`` made of it
    (its blocks, cut at a repeating tail, are the text the user gets and what is compared);
    ``text_layer`` is the page's PDF text (``PageImage.text_layer``: ``None`` for images and pages
    without one) and ``has_ink`` whether its pixels show anything (``PageImage.has_ink``). A page is
    ``low_agreement`` when its agreement is under ``min_agreement`` (0-1). Never raises.
    """
    raw = text.text.split(END_MARKER, 1)[0].replace(PAD_MARKER, "")
    recognised = tokens(strip_markup("\n".join(block.content for block in parsed.blocks)))
    agreement = None
    layer_has_text = False
    if text_layer is not None:
        layer = tokens(text_layer)
        layer_has_text = bool(layer)
        if sum(layer.values()) >= MIN_LAYER_TOKENS:
            agreement = round(f1(recognised, layer), 3)
    found = {
        "no_end_marker": not text.finished,
        "repeating_tail": repeating_tail(raw),
        # A page of figures only may rightly have no words, but the model then still boxes them.
        "empty_output": not recognised
        and not any(block.boxes for block in parsed.blocks)
        and (layer_has_text or has_ink),
        "low_agreement": agreement is not None and agreement < min_agreement,
        "box_outside_page": box_outside_page(raw),
    }
    return PageQuality(agreement, tuple(reason for reason in REASONS if found[reason]))


def strip_markup(text: str) -> str:
    """``text`` without HTML tags and entities, LaTeX commands (Greek letters become letters) or
    Markdown link targets."""
    text = _MD_LINK_TARGET.sub("]", text)
    text = _HTML_TAG.sub(" ", text)
    text = _LATEX_COMMAND.sub(lambda command: f" {_GREEK.get(command[1], '')} ", text)
    return html.unescape(text)


def tokens(text: str) -> Counter[str]:
    """The bag of tokens compared: words, and character bigrams of unspaced scripts (module doc)."""
    text = unicodedata.normalize("NFKC", text).casefold().replace("_", " ")
    bag: Counter[str] = Counter()
    if text and max(text) >= _UNSPACED_FIRST:  # one pass in C spares three regex scans of Latin text
        text = _UNSPACED_BREAK.sub("", text)
        for run in _UNSPACED_RUN.findall(text):
            bag.update([run] if len(run) == 1 else (run[i : i + 2] for i in range(len(run) - 1)))
        # A space where each unspaced run was parts it from a word it touched ("DeepSeek模型").
        text = _UNSPACED_RUN.sub(" ", text)
    bag.update(_WORD.findall(text))
    return bag


def f1(recognised: Counter[str], layer: Counter[str]) -> float:
    """Multiset F1 of two bags: 1.0 for the same tokens as often, 0.0 for none in common."""
    total = sum(recognised.values()) + sum(layer.values())
    if not total:
        return 1.0
    common = 0
    for token, count in recognised.items():  # a plain loop: three times as fast as Counter's &
        other = layer.get(token, 0)
        common += count if count < other else other
    return 2 * common / total


def repeating_tail(raw: str) -> bool:
    """Whether ``raw`` ends with a unit of up to 500 characters repeated at least 8 times over at
    least 200 characters (the thresholds are argued above ``_TAIL_MAX_PERIOD``).

    Reads only the last 4,000 characters, whatever the length: a period is tried only where the
    last character occurs again at that distance (found by ``str.rfind``, in C), and then compared
    in one slice.
    """
    n = len(raw)
    if n < _TAIL_MIN_CHARS:
        return False
    window = max(0, n - 1 - _TAIL_MAX_PERIOD)
    before = raw.rfind(raw[-1], window, n - 1)
    while before >= 0:
        period = n - 1 - before
        span = max(_TAIL_MIN_CHARS, _TAIL_MIN_REPEATS * period)
        if span > n:
            return False  # longer periods need longer spans still
        if raw[n - span : n - period] == raw[n - span + period :]:
            return True
        before = raw.rfind(raw[-1], window, before)
    return False


def box_outside_page(raw: str) -> bool:
    """Whether a det the model closed holds a box outside 0-999 or without area (x0 >= x1 or
    y0 >= y1).

    Read from the raw text because ``grounding.parse_page`` clamps every box into 0-999, orders
    its corners and drops the flat ones, so the parsed page never shows them. A det cut off by the
    end of an unfinished page is not judged.
    """
    for det in _DET.finditer(raw):
        for box in _BOX.finditer(det[1]):
            x0, y0, x1, y1 = (float(value) for value in box.groups())
            if min(x0, y0, x1, y1) < 0 or max(x0, y0, x1, y1) > _BOX_MAX or x0 >= x1 or y0 >= y1:
                return True
    return False
