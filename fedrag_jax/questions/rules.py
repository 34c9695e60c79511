"""Rules that turn a passage's sentences into factoid questions whose answer is a span of it.

Each rule reads one article ({id, title, text}, optionally metadata {topic, description}) and
returns candidate questions of one kind. Rules match regular expressions over the lead
sentences of encyclopedia-style text ("X is a city in Y", "It was founded in 1850 by Z",
"X is a chemical element; it has symbol Fe and atomic number 26"). They favour precision over
recall: a sentence that does not fit a pattern exactly yields no question. The measured
precision of each kind is in docs/questions.md.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from ..qa_data import answer_for, question_for
from .lexicon import (
    COUNTRIES,
    COUNTRY_ALIASES,
    NATIONALITIES,
    PERSON_NOUNS,
    PLACE_NOUNS,
)


@dataclass(frozen=True)
class Candidate:
    """One question a rule made: its kind, text, acceptable answers (the first is the
    canonical one) and the sentence of the passage that states the answer."""

    kind: str
    rule: str
    query: str
    answers: tuple[str, ...]
    evidence: str


@dataclass
class Article:
    """A corpus record prepared for the rules."""

    id: str
    title: str
    text: str
    topic: str = ""
    description: str = ""
    sentences: list[str] = field(default_factory=list)
    subject: str = ""  # the title without its disambiguation: "Mercury (planet)" -> "Mercury"
    phrase: str = ""  # the subject as a question names it: "the Sahara", "starfish"

    @classmethod
    def from_record(cls, record: dict) -> Article:
        meta = record.get("metadata") or {}
        title = (record.get("title") or "").strip()
        text = record.get("text") or ""
        a = cls(id=str(record["id"]), title=title, text=text, topic=meta.get("topic", "") or "",
                description=meta.get("description", "") or "", sentences=split_sentences(text))
        a.subject = answer_for(title) if title else ""
        a.phrase = subject_phrase(a.subject, a.sentences[0] if a.sentences else "", text)
        return a


# --- text helpers ----------------------------------------------------------------------------
# Sentence ends: ". " before a capital, except after an initial ("H. G. Wells"), a title
# ("St.", "Dr.") or "c." (circa).
_NO_SPLIT_AFTER = re.compile(
    r"(?:\b[A-Z]|\b(?:St|Dr|Mr|Mrs|Ms|Jr|Sr|Prof|Gen|Col|Lt|Sgt|Capt|Rev|Mt|No|Nos|vs|Co|Inc|"
    r"Ltd|Bros|c|ca|approx|e\.g|i\.e|U\.S|D\.C|Ph\.D|etc|al))\.$")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[A-Z\"'(\d])|\n+")


def split_sentences(text: str) -> list[str]:
    parts: list[str] = []
    start = 0
    for m in _SENTENCE_END.finditer(text):
        piece = text[start:m.start()].strip() if m.group(0).startswith("\n") else \
            text[start:m.end()].strip()
        if not m.group(0).startswith("\n") and _NO_SPLIT_AFTER.search(piece):
            continue
        if piece:
            parts.append(piece)
        start = m.end()
    tail = text[start:].strip()
    if tail:
        parts.append(tail)
    return [" ".join(p.split()) for p in parts]


def _starts_with_word(s: str, prefix: str) -> bool:
    """``s`` starts with ``prefix`` followed by a non-word character (or ends there)."""
    return s.startswith(prefix) and not s[len(prefix):len(prefix) + 1].isalnum()


def subject_phrase(subject: str, first_sentence: str, text: str = "") -> str:
    """How a question names the subject, copied from how the passage does: "The Sahara is"
    -> "the Sahara"; "A barracuda is" -> "the barracuda"; "Moths are" -> "moths"; a common
    noun the passage writes in lower case ("black pepper") in lower case; else the title."""
    if not subject:
        return ""
    if subject.startswith("The "):
        return subject
    can_lower = subject[:1].isupper() and (len(subject) == 1 or subject[1:2].islower())
    low = subject[0].lower() + subject[1:] if can_lower else subject
    first = first_sentence
    if _starts_with_word(first, f"The {subject}"):
        return f"the {subject}"
    if can_lower and any(_starts_with_word(first, f"{art} {low}") for art in ("The", "A", "An")):
        return f"the {low}"
    if can_lower and (_starts_with_word(first.split(", ", 1)[-1], f"the {low}")):
        return f"the {low}"  # "In mathematics, the axiom of choice is ..."
    common = can_lower and re.search(rf"\b{re.escape(low)}\b", text) is not None \
        if low in text else False
    for suffix in ("s", "es"):
        if _starts_with_word(first, subject + suffix) and \
                first[len(subject) + len(suffix):].startswith((" are", " were")):
            return (low if common else subject) + suffix
    return low if common else subject


def _clean(span: str) -> str:
    return " ".join(span.strip(" ,;:").split())


_NUMBER = r"\d[\d,]*(?:\.\d+)?(?: (?:million|billion|thousand))?"
_QUALIFIER = (r"(?:(?:about|approximately|around|over|more than|nearly|roughly|almost|"
              r"an estimated|some|just over|just under|at least|estimated|c\.|circa|"
              r"close to|under|less than|up to) )?")
_YEAR = r"(?:1\d{3}|20[0-2]\d)"
_MONTH = (r"(?:January|February|March|April|May|June|July|August|September|October|"
          r"November|December)")
_DATE = rf"(?:\d{{1,2}} {_MONTH} {_YEAR}|{_MONTH} \d{{1,2}}, {_YEAR}|{_MONTH} {_YEAR})"
# a proper name: capitalised words, initials ("H. G."), lower-case particles inside
_NAME_WORD = r"(?:[A-Z]\.|(?:St|Jr|Sr|Dr)\.|[A-Z][\w'’\-]*\w|[IVX]+\b)"
_PARTICLE = r"(?:de|da|di|del|della|van|von|der|den|du|la|le|y|al|bin|ibn|of|the)"
NAME = rf"{_NAME_WORD}(?: (?:{_NAME_WORD}|{_PARTICLE}(?= [A-Z])))*"


def _names(span: str) -> list[str]:
    """"Larry Page and Sergey Brin" -> both names; a trailing particle is dropped."""
    parts = re.split(r",? and |, ", span)
    return [p.strip() for p in parts if p.strip() and p.strip()[0].isupper()]


def number_answers(num: str, unit: str = "", num2: str = "", unit2: str = "") -> tuple[str, ...]:
    """The stated figure with and without its unit, and the converted figure if given."""
    out = []
    if unit:
        out.append(f"{num} {unit}")
    out.append(num)
    if num2:
        if unit2:
            out.append(f"{num2} {unit2}")
        out.append(num2)
    return tuple(dict.fromkeys(out))



# Rules that need the sentence to be about the article find where its subject ends at the
# sentence's start in Python (_subject_ends), then match a static pattern from there:
# patterns stay compiled once (one per article would compile ~100k times over the corpus).
# "X, officially Y, is ..." and "X (born ...) was ..." skip one apposition.
_APPOS = r"(?: \([^)]*\))?(?:, [^,;]{1,80},)?"
_GENERIC_THE = re.compile(r"The [a-z]+(?: [a-z]+){0,2}")


def _subject_ends(a: Article, s: str, pronouns: tuple[str, ...] = ("It",)) -> list[int]:
    """Where the article's subject can end at the start of sentence ``s``: after its title,
    its phrase ("the tomato"), a pronoun, or "The <common noun>" ("The city")."""
    ends = []
    for p in pronouns:
        if s.startswith(p) and s[len(p):len(p) + 1] in (" ", ","):
            ends.append(len(p))
    bare = a.phrase[4:] if a.phrase.startswith("the ") else a.phrase
    names = {n for n in (a.subject, a.title, bare, bare[:1].upper() + bare[1:]) if n}
    for name in sorted(names, key=len, reverse=True):
        for article in ("", "The ", "the ", "A ", "An "):
            n = len(article) + len(name)
            if s.startswith(article + name) and s[n:n + 1] in (" ", ",", ""):
                ends.append(n)
            elif s.startswith(article + name + "s") and s[n + 1:n + 2] == " ":
                ends.append(n + 1)  # "Moths are"
    m = _GENERIC_THE.match(s)
    if m:
        words = m.group(0).split(" ")
        ends += [len(" ".join(words[:k])) for k in range(2, len(words) + 1)]
    return sorted(set(ends), reverse=True)


def _after_subject(a: Article, s: str, pattern: re.Pattern, pronouns: tuple[str, ...] = ("It",),
                   not_subject: re.Pattern | None = None):
    """``pattern`` matched right after the subject at the start of ``s``, or None.
    ``not_subject``: words that, in the subject ("The wider urban area"), name another
    thing than the article's subject."""
    for end in _subject_ends(a, s, pronouns):
        if not_subject is not None and not_subject.search(s[:end]):
            continue
        m = pattern.match(s, end)
        if m:
            return m
    return None


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", s.lower()).strip()


def _lead(a: Article, n: int = 3) -> list[str]:
    return a.sentences[:n]


# --- kind: title (needs the description metadata) -------------------------------------------
def _specific(description: str) -> bool:
    """A description that picks out one article: it holds a date or number ("1862 novel by
    Victor Hugo", "Chemical element with atomic number 26 (Fe)", "(1711–1776)"), names a
    capital ("Capital of Tamil Nadu, India") or is long (eight words or more). Short ones
    name a class, not a member ("Species of butterfly", "Island country in the
    Mediterranean Sea", "Method for determining the age of objects"): reading 100 of the
    template's questions found 23 ambiguous, nearly all of this kind (docs/questions.md)."""
    words = description.split()
    return bool(re.search(r"\d", description)) or len(words) >= 8 or \
        description.lower().startswith("capital")


def _title_question(description: str, topic: str) -> str:
    """qa_data's template, but "Who" only for a person (the topic, or a lifespan and an
    occupation in the description): its year rule alone made "Who is the period of European
    thought (1355–1650)?"."""
    q = question_for(description, topic)
    lifespan = re.search(r"\((?:c\. ?)?\d{3,4}\s*[–-]|\(born \d{4}", description)
    person = topic == "People" or bool(lifespan) and any(
        w.strip(",;()").lower() in PERSON_NOUNS for w in description.split())
    wh = "Who" if person else "What"
    return wh + q[q.index(" "):]


def rule_title(a: Article) -> list[Candidate]:
    """"What is the <description>?" -> the title (the demo's template; qa_data.py)."""
    d, title = a.description, a.title
    if not d or not title or len(d.split()) < 3 or title.lower() in d.lower():
        return []
    if not _specific(d):
        return []
    answers = (answer_for(title),) + ((title,) if answer_for(title) != title else ())
    return [Candidate("title", "description", _title_question(d, a.topic), answers,
                      a.sentences[0] if a.sentences else "")]


# --- kind: nationality ------------------------------------------------------------------------
_NAT_MAX_WORDS = 3
_PERSON_PRONOUN = re.compile(r"\b(?:He|She|His|Her|he|she|his|her)\b")
_WAS_A = re.compile(r" (was|is) (?:an?|the) ")
_PRE_NATIONALITY = frozenset("former ancient renowned famous prominent celebrated legendary "
                             "leading retired medieval early influential noted late "
                             "contemporary classical eminent".split())


def _nationality_at(words: list[str], i: int) -> tuple[str, int] | None:
    for n in range(_NAT_MAX_WORDS, 0, -1):
        cand = " ".join(words[i:i + n])
        if cand in NATIONALITIES:
            return cand, i + n
    return None


def rule_nationality(a: Article) -> list[Candidate]:
    """"X was an American composer" -> "What nationality was X?" -> "American"."""
    if not a.sentences or not _PERSON_PRONOUN.search(a.text):
        return []
    s = a.sentences[0]
    m = _WAS_A.search(s)
    if not m:
        return []
    verb = m.group(1)
    words = re.sub(r"[,;]", lambda x: f" {x.group(0)} ", s[m.end():]).split()
    i = 0
    while i < 2 and i < len(words) and words[i] in _PRE_NATIONALITY:
        i += 1  # "a former", "an ancient"; never "a novel by English author ..."
    found: list[str] = []
    while i < len(words):
        hit = _nationality_at(words, i)
        if hit is None:
            break
        found.append(hit[0])
        i = hit[1]
        if i < len(words) and words[i] in ("and", ","):
            i += 1
            if i < len(words) and words[i] == "and":
                i += 1
            continue
        if _nationality_at(words, i) is None:  # "a Macedonian Greek general": go on
            break
    if not found or any(w.endswith("-born") for w in words[:i + 1]):
        return []
    # the words after the adjectives must name an occupation: "American *film director*"
    tail = [w.lower().strip(",;") for w in words[i:i + 4]]
    if not any(w in PERSON_NOUNS for w in tail):
        return []
    answers = found + [f.split(" ", 1)[1] for f in found if f.startswith("Ancient ")]
    return [Candidate("nationality", "was_a_nationality",
                      f"What nationality {verb} {a.phrase}?", tuple(dict.fromkeys(answers)), s)]


# --- kind: year -------------------------------------------------------------------------------
_WORK_VERBS = {
    "film": "released", "album": "released", "song": "released", "single": "released",
    "video game": "released", "novel": "published", "novella": "published",
    "book": "published", "poem": "published", "short story": "published",
    "painting": "painted", "play": "first performed", "opera": "first performed",
    "ballet": "first performed", "musical": "first performed", "treaty": "signed",
}
_WORK_YEAR = re.compile(
    rf"^(?:[^;]|; or,)*? (?:is|was) an? ({_YEAR}) (?:[\w\-'’]+ ){{0,6}}?("
    + "|".join(sorted(map(re.escape, _WORK_VERBS), key=len, reverse=True)) + r")\b")


def rule_work_year(a: Article) -> list[Candidate]:
    """"X is a 1942 American film" -> "In what year was X released?" -> "1942"."""
    if not a.sentences:
        return []
    s = a.sentences[0]
    m = _WORK_YEAR.search(s)
    if not m:
        return []
    return [Candidate("year", "work_year",
                      f"In what year was {a.phrase} {_WORK_VERBS[m.group(2)]}?",
                      (m.group(1),), s)]


_EVENT_VERBS = {
    "founded": "founded", "co-founded": "founded", "established": "established",
    "published": "published", "first published": "first published", "released": "released",
    "premiered": "first performed", "first performed": "first performed",
    "discovered": "discovered", "invented": "invented", "built": "built",
    "completed": "completed", "opened": "opened", "signed": "signed", "formed": "formed",
    "launched": "launched", "created": "created", "introduced": "introduced",
    "ratified": "ratified", "adopted": "adopted", "constructed": "constructed",
    "dissolved": "dissolved", "abolished": "abolished", "isolated": "first isolated",
    "first isolated": "first isolated", "enacted": "enacted", "incorporated": "incorporated",
    "consecrated": "consecrated", "inaugurated": "inaugurated",
    "first described": "first described", "unveiled": "unveiled", "erected": "erected",
    "written": "written", "composed": "composed", "painted": "painted", "recorded": "recorded",
    "patented": "patented", "first flown": "first flown", "first broadcast": "first broadcast",
}
_EVENT_YEAR = re.compile(
    rf"{_APPOS},? (?:was|were) (?:first |originally |officially |formally |initially |jointly )?"
    r"(" + "|".join(sorted(map(re.escape, _EVENT_VERBS), key=len, reverse=True)) + r")"
    rf"((?: (?!in\b|on\b)[\w'’.\-]+){{0,7}}?) (?:in|on) ({_DATE}|{_YEAR})\b(?! BC)")
_CLAUSE_BREAK = re.compile(r"\d|,| (?:which|that|who|when|and|after|before|where)\b")


def _year_answers(when: str) -> tuple[str, ...]:
    year = re.search(_YEAR, when).group(0)
    return (year, when) if when != year else (year,)


_PARTICIPLE_YEAR = re.compile(
    rf"^(Founded|Established|Built|Completed|Published|First published|Opened|Formed|Launched|"
    rf"Constructed|Written|Composed|Painted|Released) (?:in|on) ({_DATE}|{_YEAR})\b(?! BC)"
    rf"(?: (?:by|as|in|at) [^,;]{{1,60}})?, ")
_THEN_ANY_VERB = re.compile(r"(?: \([^)]*\))?,? (?:is|was|are|were|has|had|became|remains) ")


def rule_event_year(a: Article) -> list[Candidate]:
    """"It was founded in 1850" / "X was first published on 3 March 1923" / "Founded in
    1850, X is ..." -> "When was X founded?" -> "1850" (and the full date if given)."""
    for s in _lead(a, 5):
        m = _PARTICIPLE_YEAR.match(s)
        if m and _after_subject(a, s[m.end():], _THEN_ANY_VERB):
            verb = _EVENT_VERBS[m.group(1).lower()]
            return [Candidate("year", "event_year", f"When was {a.phrase} {verb}?",
                              _year_answers(m.group(2)), s)]
        m = _after_subject(a, s, _EVENT_YEAR)
        # between the verb and the date: nothing, "by <name>" or a place; never a new clause
        if not m or _CLAUSE_BREAK.search(m.group(2)):
            continue
        return [Candidate("year", "event_year",
                          f"When was {a.phrase} {_EVENT_VERBS[m.group(1)]}?",
                          _year_answers(m.group(3)), s)]
    return []


_ROLES = (r"(?:[Kk]ing|[Qq]ueen|[Ee]mperor|[Ee]mpress|[Pp]resident|[Pp]rime [Mm]inister|"
          r"[Cc]hancellor|[Pp]ope|[Ss]ultan|[Ss]hah|[Tt]sar|[Cc]aliph|[Pp]haraoh|[Gg]overnor|"
          r"Grand Duke|[Cc]hairman|[Pp]remier|Secretary-General|Holy Roman Emperor|[Ee]mir|"
          r"[Dd]oge|[Ss]hogun)")
_OFFICE_YEAR = re.compile(
    rf"{_APPOS} (?:was|served as|is) (the )?"
    rf"((?:\d+(?:st|nd|rd|th) |first |second |third |last )?{_ROLES}"
    rf"(?: of (?:the )?{NAME})?) from (?:(\d{{1,2}} {_MONTH}|{_MONTH} \d{{1,2}},?|{_MONTH}) )?"
    rf"(\d{{3,4}})\b(?! BC)")


def rule_office_year(a: Article) -> list[Candidate]:
    """"X was King of Sweden from 1697 to 1718" -> "In what year did X become King of
    Sweden?" -> "1697"."""
    for s in _lead(a, 3):
        m = _after_subject(a, s, _OFFICE_YEAR, ("He", "She"))
        if not m:
            continue
        role = (m.group(1) or "") + m.group(2)
        year = m.group(4)
        answers = (year, f"{m.group(3)} {year}") if m.group(3) else (year,)
        return [Candidate("year", "office_year", f"In what year did {a.phrase} become {role}?",
                          answers, s)]
    return []


_WHEN_FORMS = {"was fought": "When was {} fought?", "were fought": "When were {} fought?",
               "took place": "When did {} take place?", "occurred": "When did {} occur?",
               "began": "When did {} begin?", "started": "When did {} start?"}
_WHEN_YEAR = re.compile(
    rf"{_APPOS},? (" + "|".join(map(re.escape, _WHEN_FORMS)) + r")"
    rf"((?: (?!in\b|on\b|from\b)[\w'’.\-]+){{0,4}}?) (?:in|on) ({_DATE}|{_YEAR})\b(?! BC)")


def rule_when_year(a: Article) -> list[Candidate]:
    """"The Battle of X was fought on 18 June 1815" -> "When was the Battle of X fought?";
    "X took place in 2008" -> "When did X take place?"."""
    for s in _lead(a, 3):
        m = _after_subject(a, s, _WHEN_YEAR)
        if not m or re.search(r"\d|,", m.group(2)):
            continue
        return [Candidate("year", "when_year", _WHEN_FORMS[m.group(1)].format(a.phrase),
                          _year_answers(m.group(3)), s)]
    return []


_DEATH_YEAR = re.compile(rf"\buntil (?:his|her) death (?:in|on) ({_DATE}|{_YEAR})\b")


def rule_death_year(a: Article) -> list[Candidate]:
    """"X was King of France from 1515 until his death in 1547" -> "In what year did X
    die?" -> "1547"; only in a sentence whose subject is the article's."""
    for s in _lead(a, 4):
        m = _DEATH_YEAR.search(s)
        if m and _subject_ends(a, s, ("He", "She")):
            return [Candidate("year", "death_year", f"In what year did {a.phrase} die?",
                              _year_answers(m.group(1)), s)]
    return []


_PRIZES = (r"Nobel Prize in [A-Z][a-z]+(?: or Medicine)?|Nobel Peace Prize|Nobel Memorial Prize "
           r"in Economic Sciences|Pulitzer Prize for [A-Z][a-z]+(?: [A-Z][a-z]+)?")
_AWARD_YEAR = re.compile(rf"{_APPOS} (?:was awarded|received|won|was the recipient of) the "
                         rf"({_PRIZES}) in ({_YEAR})\b")


def rule_award_year(a: Article) -> list[Candidate]:
    """"He received the Nobel Prize in Physics in 1921" -> "In what year did X receive the
    Nobel Prize in Physics?" -> "1921"."""
    for s in a.sentences[:6]:
        if "Prize" not in s:
            continue
        m = _after_subject(a, s, _AWARD_YEAR, ("He", "She"))
        if m:
            return [Candidate("year", "award_year",
                              f"In what year did {a.phrase} receive the {m.group(1)}?",
                              (m.group(2),), s)]
    return []


# --- kind: place ------------------------------------------------------------------------------
_COUNTRY_NAMES = sorted(set(COUNTRIES) | {n for v in COUNTRY_ALIASES.values() for n in v},
                        key=len, reverse=True)
_CANONICAL = {alias: c for c, aliases in COUNTRY_ALIASES.items() for alias in aliases}
_COUNTRY_RE = re.compile(r"(?<![\w.])(?:the )?(" + "|".join(map(re.escape, _COUNTRY_NAMES))
                         + r")(?![\w'’\-]| of\b)")
_PLACE_IN = re.compile(
    r"^[^;]*? (is|was) (?:an?|the) ((?:[\w\-'’]+ ){0,5}?)(?:"
    + "|".join(sorted(map(re.escape, PLACE_NOUNS), key=len, reverse=True))
    + r")(?: (?:located|situated|lying))? (?:in|on|of) ([^;]*)")
_COUNTRYISH = re.compile(r"\b(?:country|nation|sovereign state|republic|kingdom)\b")


def _countries_in(text: str) -> list[str]:
    """Country names in ``text`` that are not the tail of a longer proper name ("Northern
    Ireland" names no country of the list; "Guinea" in "Papua New Guinea" is not Guinea)."""
    out = []
    for m in _COUNTRY_RE.finditer(text):
        before = text[:m.start(1)].split(" ")[-2:-1] or [""]  # the word just before, if any
        if before[0][:1].isupper() and before[0][-1:].isalnum() and before[0] != "The":
            continue  # "Northern Ireland"; but "Tokyo, Japan" names Japan
        if text[m.end(1):m.end(1) + 1] in ("-", "’", "'"):
            continue
        out.append(m.group(1))
    return out


def country_answers(name: str) -> tuple[str, ...]:
    canonical = _CANONICAL.get(name, name)
    return tuple(dict.fromkeys((name, canonical, *COUNTRY_ALIASES.get(canonical, ()))))


def _is_country(a: Article) -> bool:
    return a.subject in COUNTRIES or a.subject in _CANONICAL or \
        bool(_COUNTRYISH.search(a.sentences[0][:200] if a.sentences else ""))


def rule_place_country(a: Article) -> list[Candidate]:
    """"X is a lake in northwestern Russia" -> "In which country is X?" -> "Russia"."""
    if not a.sentences or _is_country(a):
        return []
    s = a.sentences[0]
    m = _PLACE_IN.search(s)
    if not m or re.search(r"\b(?:former|ancient|historical|historic)\b", m.group(2)):
        return []
    where = re.split(r"\(| which | that | and is | and was | where | known ", m.group(3))[0]
    countries = _countries_in(where)
    if not countries or len({_CANONICAL.get(c, c) for c in countries}) > 1:
        return []  # no country named, or several: the sentence is about more than one
    if a.subject in countries[0] or countries[0] in a.subject:
        return []
    return [Candidate("place", "place_in_country", f"In which country {m.group(1)} {a.phrase}?",
                      country_answers(countries[0]), s)]


_REGION_NOUNS = ("state", "province", "region", "prefecture", "county", "oblast", "governorate",
                 "emirate", "territory", "island", "department", "district", "autonomous region")
_REGION = "(" + "|".join(sorted(map(re.escape, _REGION_NOUNS), key=len, reverse=True)) + ")"
_CAPITAL_OF = re.compile(r"^[^;]*? is the capital(?: city)?(?: and (?:the )?(?:largest|most "
                         r"populous)(?: city)?)? of (?:the )?([^.;,(]*)")
_REGION_OF = re.compile(rf"(?:[A-Z][\w\-]+ )*{_REGION} of ({NAME})$")
_NAME_REGION = re.compile(rf"({NAME}) {_REGION}\b")
_NAME_ONLY = re.compile(rf"({NAME})$")


def rule_capital_of(a: Article) -> list[Candidate]:
    """"X is the capital and largest city of Romania" -> "Of which country is X the
    capital?" -> "Romania"; a province or state is asked for by its noun."""
    if not a.sentences:
        return []
    s = a.sentences[0]
    m = _CAPITAL_OF.search(s)
    if not m:
        return []
    where = m.group(1).strip()
    noun = None
    if r := _REGION_OF.match(where):
        noun, name = r.group(1), r.group(2)
    elif r := _NAME_REGION.match(where):
        name, noun = r.group(1), r.group(2)
    elif r := _NAME_ONLY.match(where):
        name = r.group(1)
    else:
        return []
    if name in COUNTRIES or name in _CANONICAL:
        return [Candidate("place", "capital_of", f"Of which country is {a.phrase} the capital?",
                          country_answers(name), s)]
    if name == a.subject or noun is None:
        return []
    return [Candidate("place", "capital_of", f"Of which {noun} is {a.phrase} the capital?",
                      (name,), s)]


_ITS_CAPITAL = re.compile(rf"^(?:Its|The) capital(?: city)?(?: and (?:the )?(?:largest|most "
                          rf"populous)(?: city)?)?,? (is|was) ({NAME})")


def rule_country_capital(a: Article) -> list[Candidate]:
    """"Its capital and largest city is Havana" -> "What is the capital of X?" -> "Havana"."""
    for s in a.sentences[:8]:
        m = _ITS_CAPITAL.search(s)
        if m and m.group(2) != a.subject and not m.group(2).startswith("The "):
            return [Candidate("place", "country_capital",
                              f"What {m.group(1)} the capital of {a.phrase}?", (m.group(2),), s)]
    return []


_BORN_IN = re.compile(rf"\b(?:He|She) was born (?:on {_DATE} )?(?:in {_YEAR} )?in ({NAME})"
                      rf"(?:, ({NAME}))?(?=[ ,.;])")


def rule_born_in(a: Article) -> list[Candidate]:
    """"He was born in Pisa" -> "Where was X born?" -> "Pisa"."""
    for s in a.sentences[:6]:
        m = _BORN_IN.search(s)
        if m and not m.group(1).startswith("The "):
            answers = (m.group(1),) + ((f"{m.group(1)}, {m.group(2)}",) if m.group(2) else ())
            return [Candidate("place", "born_in", f"Where was {a.phrase} born?", answers, s)]
    return []


_HEADQUARTERS = re.compile(rf"{_APPOS}(?: [^,.;]{{0,80}}?)? (?:is|was) (?:headquartered|based) "
                           rf"in ({NAME})(?:, ({NAME}))?(?=[ ,.;])")


def rule_headquarters(a: Article) -> list[Candidate]:
    """"It is headquartered in Cupertino, California" -> "Where is X headquartered?"."""
    for s in a.sentences[:5]:
        m = _after_subject(a, s, _HEADQUARTERS) if "ed in" in s else None
        if m and m.group(1) != a.subject:
            answers = (m.group(1),) + ((f"{m.group(1)}, {m.group(2)}",) if m.group(2) else ())
            return [Candidate("place", "headquarters", f"Where is {a.phrase} headquartered?",
                              answers, s)]
    return []


# --- kind: number -----------------------------------------------------------------------------
_NOT_THE_SUBJECT = re.compile(r"\b(?:metropolitan|metro|urban|agglomeration|greater|county|"
                              r"district|province|region|combined|wider|municipality|state|"
                              r"prefecture|conurbation|city proper|island|department|basin|"
                              r"watershed|catchment|drainage|surrounding|suburbs?)\b", re.I)
_POPULATION_FIGURE = (rf"(?:(?:has|had|with) a(?:n estimated| total)? population of|"
                      rf"(?:has|had) an estimated population of|population (?:was|is)) "
                      rf"{_QUALIFIER}({_NUMBER})(?!\d|,\d)")
_POPULATION = re.compile(rf"{_APPOS}(?P<mid>[^.;]{{0,120}}?) {_POPULATION_FIGURE}")
_ITS_POPULATION = re.compile(rf"^(?:As of [^,]+, )?[Ii]ts(?: total)? population (?:was|is) "
                             rf"{_QUALIFIER}({_NUMBER})(?!\d|,\d)")


def rule_population(a: Article) -> list[Candidate]:
    """"X has a population of 4,664,124" -> "What is the population of X?"."""
    for s in _lead(a, 4):
        if "population" not in s:
            continue
        m = _ITS_POPULATION.match(s) or _after_subject(a, s, _POPULATION,
                                                      not_subject=_NOT_THE_SUBJECT)
        if not m or ("mid" in m.re.groupindex and _NOT_THE_SUBJECT.search(m.group("mid"))):
            continue
        return [Candidate("number", "population", f"What is the population of {a.phrase}?",
                          number_answers(m.group(m.re.groups).rstrip(",.")), s)]
    return []


_ATOMIC = re.compile(r"chemical element; it has symbol ([A-Z][a-z]?) and atomic number (\d+)")


def rule_atomic_number(a: Article) -> list[Candidate]:
    """"X is a chemical element; it has symbol Fe and atomic number 26"."""
    s = a.sentences[0] if a.sentences else ""
    m = _ATOMIC.search(s)
    if not m:
        return []
    return [Candidate("number", "atomic_number", f"What is the atomic number of {a.phrase}?",
                      (m.group(2),), s)]


_AREA_UNITS = (r"(km2|km²|sq km|square kilometres|square kilometers|square kilometre|"
               r"square miles|sq mi|hectares|acres)")
_AREA_FIGURE = (rf"(?:a |an )?(?:total |land )?area of {_QUALIFIER}({_NUMBER}) ?{_AREA_UNITS}"
                rf"(?: \(({_NUMBER}) ?{_AREA_UNITS}\))?")
_AREA = re.compile(rf"{_APPOS}(?P<mid>[^.;]{{0,80}}?),? (?:covers |has |with |spans |occupies )"
                   rf"{_AREA_FIGURE}")
_AREA_FIRST = re.compile(rf"^(?:With|Covering) {_AREA_FIGURE}, ")
_THEN_VERB = re.compile(r"(?: \([^)]*\))?,? (?:is|was|has|ranks|sits|lies|are) ")


def rule_area(a: Article) -> list[Candidate]:
    """"It covers an area of 541.4 square kilometers (209.0 sq mi)" -> "What is the area
    of X?"."""
    for s in _lead(a, 5):
        if "area of" not in s:
            continue
        m = _after_subject(a, s, _AREA, not_subject=_NOT_THE_SUBJECT)
        if m and _NOT_THE_SUBJECT.search(m.group("mid")):
            m = None
        if m is None:
            m = _AREA_FIRST.match(s)
            if m and not _after_subject(a, s[m.end():], _THEN_VERB,
                                        not_subject=_NOT_THE_SUBJECT):
                m = None
        if m:
            # the figures and their units in the order the sentence gives them
            figs = re.findall(rf"({_NUMBER}) ?{_AREA_UNITS}", m.group(0))
            (num, unit), rest = figs[0], figs[1:]
            return [Candidate("number", "area", f"What is the area of {a.phrase}?",
                              number_answers(num, unit, *(rest[0] if rest else ("", ""))), s)]
    return []


_SPECIES = re.compile(
    rf"{_APPOS} (?:is|are) (?:a|an|the)? ?(?:[\w\-]+ ){{0,3}}?(?:genus|family|order|subfamily|"
    rf"tribe|group|clade|class|superfamily) (?:of|with|containing|comprising|that (?:contains|"
    rf"includes|comprises)) {_QUALIFIER}(\d[\d,]*) (?:known |extant |recognized |recognised |"
    rf"living |described |accepted |currently accepted )?species\b")


def rule_species_count(a: Article) -> list[Candidate]:
    """"X is a genus of about 80 species" -> "How many species of X are there?"."""
    s = a.sentences[0] if a.sentences else ""
    m = _after_subject(a, s, _SPECIES)
    if not m:
        return []
    return [Candidate("number", "species_count", f"How many species of {a.phrase} are there?",
                      (m.group(1),), s)]


_SPEAKERS = re.compile(rf"{_APPOS}(?: [^.;]{{0,60}}?)? (?:has|had) {_QUALIFIER}({_NUMBER}) "
                       rf"(native )?speakers\b")


def rule_speakers(a: Article) -> list[Candidate]:
    """"It has about 32 million native speakers" -> "How many native speakers does X have?"."""
    if not re.search(r"\blanguages?\b", a.subject + " " + (a.sentences[0] if a.sentences else "")):
        return []
    for s in _lead(a, 4):
        m = _after_subject(a, s, _SPEAKERS) if "speakers" in s else None
        if m and not re.search(r"\b(?:second|L2|total)\b", m.group(0)):
            native = "native " if m.group(2) else ""
            return [Candidate("number", "speakers",
                              f"How many {native}speakers does {a.phrase} have?",
                              (m.group(1),), s)]
    return []


_LENGTH_UNITS = r"(kilometres|kilometers|km|miles|mi|metres|meters|m)"
_LENGTH = re.compile(rf"{_APPOS} (?:is|was) {_QUALIFIER}({_NUMBER}) {_LENGTH_UNITS} "
                     rf"\(({_NUMBER}) {_LENGTH_UNITS}\) long\b")
_LENGTH_FIRST = re.compile(rf"^With a (?:total )?length of {_QUALIFIER}({_NUMBER}) {_LENGTH_UNITS}"
                           rf"(?: \(({_NUMBER}) {_LENGTH_UNITS}\))?, ")


def rule_length(a: Article) -> list[Candidate]:
    """"The river is 2,914 kilometres (1,811 mi) long" -> "How long is X?"."""
    for s in _lead(a, 5):
        if " long" not in s and "length of" not in s:
            continue
        m = _after_subject(a, s, _LENGTH)
        if m is None:
            m = _LENGTH_FIRST.match(s)
            if m and not _after_subject(a, s[m.end():], _THEN_VERB):
                m = None
        if m:
            figs = [m.group(i) or "" for i in range(1, m.re.groups + 1)]
            return [Candidate("number", "length", f"How long is {a.phrase}?",
                              number_answers(*figs[:4]), s)]
    return []


_ELEVATION = re.compile(rf"{_APPOS}(?: [^.;]{{0,60}}?)? (?:at|has) an elevation of {_QUALIFIER}"
                        rf"({_NUMBER}) {_LENGTH_UNITS}(?: \(({_NUMBER}) (ft|feet)\))?")
_ELEVATION_FIRST = re.compile(rf"^(?:With|At) an? (?:summit )?elevation of {_QUALIFIER}"
                              rf"({_NUMBER}) {_LENGTH_UNITS}(?: \(({_NUMBER}) (ft|feet)\))?"
                              rf"(?: above sea level)?, ")


def rule_elevation(a: Article) -> list[Candidate]:
    """"With a summit elevation of 6,961 metres, X is ..." / "X ... at an elevation of N m"."""
    for s in _lead(a, 5):
        if "elevation of" not in s:
            continue
        m = _after_subject(a, s, _ELEVATION)
        if m is None:
            m = _ELEVATION_FIRST.match(s)
            if m and not _after_subject(a, s[m.end():], _THEN_VERB):
                m = None
        if m:
            figs = [m.group(i) or "" for i in range(1, m.re.groups + 1)]
            return [Candidate("number", "elevation", f"What is the elevation of {a.phrase}?",
                              number_answers(*figs[:4]), s)]
    return []


_MEMBERS = re.compile(rf"{_APPOS}(?: [^.;]{{0,80}}?)? (?:has|of|with|between|comprising) "
                      rf"(\d+) member (states|countries|nations)\b")


def rule_member_states(a: Article) -> list[Candidate]:
    """"It has 194 member states" -> "How many member states does X have?"."""
    for s in _lead(a, 4):
        m = _after_subject(a, s, _MEMBERS) if " member " in s else None
        if m:
            return [Candidate("number", "member_states",
                              f"How many member {m.group(2)} does {a.phrase} have?",
                              (m.group(1),), s)]
    return []


# --- kind: code -------------------------------------------------------------------------------
# symbols that are also common English words: "answer contained" cannot tell them apart
_WORD_SYMBOLS = frozenset({"as", "at", "be", "he", "i", "in", "no", "am", "is", "it", "on",
                           "of", "or", "an", "a", "by", "to", "so", "do", "go", "me", "my",
                           "we", "us", "es", "pa"})


def rule_chemical_symbol(a: Article) -> list[Candidate]:
    """"it has symbol Fe and atomic number 26" -> "What is the chemical symbol of X?"."""
    s = a.sentences[0] if a.sentences else ""
    m = _ATOMIC.search(s)
    if not m or m.group(1).lower() in _WORD_SYMBOLS:
        return []
    return [Candidate("code", "chemical_symbol", f"What is the chemical symbol of {a.phrase}?",
                      (m.group(1),), s)]


_ABBREVIATED = re.compile(r"^(?:In [^,]{1,40}, )?(?:The |the |An? |an? )?([A-Za-z][^,()]*?),? "
                          r"\((?:abbreviated |abbreviation:? |commonly abbreviated (?:as )?)?"
                          r"([A-Z][A-Za-z0-9&./\-]{1,9})\)")


def _abbreviates(abbr: str, expansion: str) -> bool:
    """"QED" abbreviates "quantum electrodynamics": its letters appear in order in the
    expansion and its first letter starts one of the expansion's words; or its letters are
    the expansion's initials in another order ("UTC", "Coordinated Universal Time")."""
    words = re.findall(r"[A-Za-z][\w'’\-]*", expansion)
    letters = re.sub(r"[^A-Z]", "", abbr.upper())
    initials = [w[0].upper() for w in words]
    if len(letters) < 2:
        return False
    if sorted(letters) == sorted(initials):
        return True
    if letters[0] not in initials:
        return False
    it = iter(re.sub(r"[^A-Z]", "", expansion.upper()))
    return all(ch in it for ch in letters)


def rule_abbreviation(a: Article) -> list[Candidate]:
    """"Coordinated Universal Time (UTC) is ..." -> "What is the abbreviation of
    Coordinated Universal Time?" -> "UTC"; when the title is the abbreviation ("NATO"),
    "What does NATO stand for?" -> the expansion."""
    if not a.sentences:
        return []
    s = a.sentences[0]
    m = _ABBREVIATED.match(s)
    if not m:
        return []
    expansion, abbr = m.group(1).strip(), m.group(2)
    if sum(ch.isupper() for ch in abbr) < 2 or abbr.lower() in _WORD_SYMBOLS:
        return []
    if not _abbreviates(abbr, expansion):
        return []  # "(UTC)" for "Coordinated Universal Time" passes; a stray code does not
    if _norm(abbr) == _norm(a.subject):
        return [Candidate("code", "expansion", f"What does {abbr} stand for?", (expansion,), s)]
    if _norm(expansion) != _norm(a.subject):
        return []
    phrase = a.phrase if not s.startswith("The ") or a.phrase.startswith("the ") \
        else f"the {a.subject}"
    return [Candidate("code", "abbreviation", f"What is the abbreviation of {phrase}?",
                      (abbr,), s)]


_UNIT_SYMBOL = re.compile(r"^(?:The |the |An? )?([^,()]+?),? \((?:unit )?symbol:? ([^\s)]{1,5})\)")


def rule_unit_symbol(a: Article) -> list[Candidate]:
    """"The farad (symbol: F) is the unit of ..." -> "What is the symbol of the farad?"."""
    if not a.sentences:
        return []
    s = a.sentences[0]
    m = _UNIT_SYMBOL.match(s)
    if not m or _norm(m.group(1)) != _norm(a.subject) or m.group(2).lower() in _WORD_SYMBOLS:
        return []
    if not re.search(r"[A-Za-zΩμ°]", m.group(2)):
        return []
    return [Candidate("code", "unit_symbol", f"What is the symbol of {a.phrase}?",
                      (m.group(2),), s)]


# --- kind: person -----------------------------------------------------------------------------
_WORK_WHO = {
    "novel": "wrote", "novella": "wrote", "play": "wrote", "poem": "wrote", "epic poem": "wrote",
    "book": "wrote", "short story": "wrote", "essay": "wrote", "treatise": "wrote",
    "memoir": "wrote", "tragedy": "wrote", "comedy": "wrote", "story": "wrote",
    "opera": "composed", "symphony": "composed", "ballet": "composed", "oratorio": "composed",
    "concerto": "composed", "cantata": "composed", "requiem": "composed", "mass": "composed",
    "song cycle": "composed", "suite": "composed",
    "painting": "painted", "fresco": "painted", "mural": "painted", "portrait": "painted",
    "sculpture": "sculpted", "statue": "sculpted",
    "album": "recorded", "film": "directed",
}
_WORK_BY = re.compile(
    r"^(?:[^;]|; or,)*? (?:is|was) (?:an?|the) (?:[\w\-'’]+ ){0,6}?("
    + "|".join(sorted(map(re.escape, _WORK_WHO), key=len, reverse=True))
    + r")(?: (?:(?:produced|written|co-written) and )?(?:written|composed|painted|sculpted|"
    r"recorded|released|published|created|directed))? by ")
_BY_VERBS = {"written": "wrote", "composed": "composed", "painted": "painted",
             "directed": "directed", "founded": "founded", "co-founded": "founded",
             "discovered": "discovered", "invented": "invented", "designed": "designed",
             "sculpted": "sculpted", "formulated": "formulated", "proposed": "proposed",
             "developed": "developed", "created": "created", "established": "established",
             "built": "built", "commissioned": "commissioned", "first isolated": "first isolated",
             "isolated": "first isolated", "first synthesized": "first synthesized"}
_MADE_BY = re.compile(
    rf"{_APPOS},? (?:was|were) (?:first |originally |jointly |later )?("
    + "|".join(sorted(map(re.escape, _BY_VERBS), key=len, reverse=True))
    + r") (?:(?:in|on) [^,.;]{1,30} )?by ")
_NAME_LIST = re.compile(rf"({NAME}(?:(?:,| and|, and) {NAME})*)(?=[ ,.;:)]|$)")
_NOT_NAMES = ("The", "A", "An", "In", "It", "His", "Her", "This", "Its")
_SKIPPABLE = re.compile(r"(?:the|an?|[a-z][\w\-]*|[A-Z][\w\-]*)$")
_PREPOSITIONS = frozenset("of in on at for from with during to into after before under over "
                          "and or which who that whose".split())


def _who(span: str) -> tuple[str, ...]:
    names = [n for n in _names(span) if n not in NATIONALITIES and n.split()[0] not in _NOT_NAMES]
    if not names:
        return ()
    full = ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]
    return tuple(dict.fromkeys([names[0], *names[1:], full]))


def _who_after_by(tail: str, max_skip: int = 6) -> tuple[str, ...]:
    """The name(s) after "by": "by the Dutch Post-Impressionist painter Vincent van Gogh" ->
    "Vincent van Gogh". Skips articles, adjectives and occupations (a capitalised word is
    skipped only when an occupation follows it); stops at a preposition."""
    pos = 0
    for _ in range(max_skip + 1):
        rest = tail[pos:]
        m = _NAME_LIST.match(rest)
        if m:
            follower = re.match(r" ([a-z][\w\-]*)", rest[m.end():])
            adjective = follower is not None and follower.group(1) in PERSON_NOUNS
            if not adjective and m.group(1) not in NATIONALITIES and \
                    m.group(1).split()[0] not in _NOT_NAMES:
                if rest[m.end():].startswith((' "', " (", " “")):
                    return ()  # 'James "Bud" Walton': the name goes on past the quote
                return _who(m.group(1))
        word = re.match(r"(\S+) ", rest)
        if not word or word.group(1) in _PREPOSITIONS or not _SKIPPABLE.match(word.group(1)):
            return ()
        pos += word.end()
    return ()


def rule_work_by(a: Article) -> list[Candidate]:
    """"X is a novel by American writer Herman Melville" -> "Who wrote X?"."""
    if not a.sentences:
        return []
    s = a.sentences[0]
    m = _WORK_BY.search(s)
    if not m:
        return []
    who = _who_after_by(s[m.end():])
    if not who:
        return []
    return [Candidate("person", "work_by", f"Who {_WORK_WHO[m.group(1)]} {a.phrase}?", who, s)]


def rule_made_by(a: Article) -> list[Candidate]:
    """"It was discovered by Friedrich Oskar Giesel in 1902" -> "Who discovered X?"."""
    for s in _lead(a, 4):
        m = _after_subject(a, s, _MADE_BY)
        if not m:
            continue
        who = _who_after_by(s[m.end():])
        if who:
            return [Candidate("person", "made_by", f"Who {_BY_VERBS[m.group(1)]} {a.phrase}?",
                              who, s)]
    return []


_PARENT = re.compile(
    rf"{_APPOS} was (?:the |a |an )?(?:(?:eldest|elder|younger|youngest|only|second|third|"
    rf"fourth|fifth|illegitimate|surviving|first|legitimate) )*(son|daughter) of ({NAME}"
    rf"(?: and {NAME})?)(?=[ ,.;]|$)")


def rule_parent(a: Article) -> list[Candidate]:
    """"He was the son of Jochi" -> "Whose son was X?" -> "Jochi"."""
    for s in a.sentences[:5]:
        m = _after_subject(a, s, _PARENT, ("He", "She"))
        if m:
            who = _who(m.group(2))
            if who:
                return [Candidate("person", "parent", f"Whose {m.group(1)} was {a.phrase}?",
                                  who, s)]
    return []


# --- kind: taxon ------------------------------------------------------------------------------
_RANK_SUFFIX = {"family": ("idae", "aceae"), "order": ("formes", "ales", "ptera", "odea", "a"),
                "genus": ("",)}
_TAXON = {rank: re.compile(rf"\b(?:in|of|to) the {rank} ([A-Z][a-z]+)\b") for rank in _RANK_SUFFIX}


def rule_taxon(a: Article) -> list[Candidate]:
    """"X is a flowering vine in the family Piperaceae" -> "To which family does X
    belong?" -> "Piperaceae" (else the order, else the genus)."""
    if not a.sentences:
        return []
    s = a.sentences[0]
    for rank, pattern in _TAXON.items():
        m = pattern.search(s)
        if not m or m.group(1) == a.subject or not m.group(1).endswith(_RANK_SUFFIX[rank]):
            continue
        if re.search(r"\b(?:caused by|which|that|whose|related to|infects?|parasite of)\b",
                     s[:m.start()]):
            continue  # the rank is another organism's
        plural = a.phrase[-1:] == "s" and not a.phrase.endswith("ss") and " are " in s[:80]
        verb = "do" if plural else "does"
        return [Candidate("taxon", f"taxon_{rank}", f"To which {rank} {verb} {a.phrase} belong?",
                          (m.group(1),), s)]
    return []


# --- registry ---------------------------------------------------------------------------------
Rule = Callable[[Article], list[Candidate]]


@dataclass(frozen=True)
class QuestionKind:
    name: str
    description: str
    rules: tuple[Rule, ...]
    needs_metadata: bool = False


KINDS: dict[str, QuestionKind] = {k.name: k for k in (
    QuestionKind("title", "the article's short description -> its title (the demo's template)",
                 (rule_title,), needs_metadata=True),
    QuestionKind("nationality", "a person's nationality adjective from the first sentence",
                 (rule_nationality,)),
    QuestionKind("year", "the year (or date) a work appeared, a thing was founded, built, "
                 "discovered, an office began, an event took place, a person died or won a "
                 "prize",
                 (rule_work_year, rule_event_year, rule_office_year, rule_when_year,
                  rule_death_year, rule_award_year)),
    QuestionKind("place", "the country a place is in, what a city is the capital of, a "
                 "country's capital, a birthplace, a headquarters",
                 (rule_capital_of, rule_place_country, rule_country_capital, rule_born_in,
                  rule_headquarters)),
    QuestionKind("number", "a figure with its unit: population, area, length, elevation, "
                 "atomic number, number of species, speakers, member states",
                 (rule_population, rule_atomic_number, rule_area, rule_species_count,
                  rule_speakers, rule_length, rule_elevation, rule_member_states)),
    QuestionKind("code", "a symbol or abbreviation: chemical symbol, unit symbol, "
                 "abbreviation of a name (or the name an abbreviation stands for)",
                 (rule_chemical_symbol, rule_abbreviation, rule_unit_symbol)),
    QuestionKind("person", "who wrote, composed, painted, founded, discovered, invented "
                 "something; whose son or daughter someone was",
                 (rule_work_by, rule_made_by, rule_parent)),
    QuestionKind("taxon", "the family, order or genus a living thing belongs to",
                 (rule_taxon,)),
)}
