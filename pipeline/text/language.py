"""Content-based language identification, without external models or downloads.

The catalog's ``Language`` column describes the *edition*; a file can still be a bilingual edition,
a translation misfiled, or an English introduction to a foreign text. The clean stage therefore
checks the text itself. Two cheap signals are enough for whole books:

* **Script**: the share of letters in Cyrillic, Han, Kana, Hangul, Greek, Hebrew, Arabic,
  Devanagari or Thai decides non-Latin languages outright (with a letter test to separate
  Russian, Ukrainian, Serbian and Bulgarian, which share the script).
* **Stopword profiles** for Latin-script languages: the most frequent function words make up
  30-50 % of running text in their own language and only a few percent in any other, so the
  profile with the highest hit rate wins, by a wide margin on book-length samples.

Only a few evenly spaced windows of the text are read (front matter and the last pages are
skipped), so a 3 MB book costs about as much as a 20 KB one.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import NamedTuple

import numpy as np

__all__ = ["LanguageGuess", "STOPWORDS", "UNDETERMINED", "chinese_script", "detect_language"]

UNDETERMINED = "und"  # ISO 639-2 code for "undetermined"
# Below this hit rate no Latin-script profile describes the text (another language, or tables).
MIN_STOPWORD_RATE = 0.12

# fmt: off
STOPWORDS: dict[str, frozenset[str]] = {
    code: frozenset(words.split())
    for code, words in {
        "en": "the of and to a in that is was he for it with as his on be at by i had not are but"
              " from or have an they which you were her all she there would their we him been has"
              " when who will no if out so said what up its into than them can could these then"
              " do my me your our shall should this upon very must those what did any such",
        "fr": "de la le et les des en un une du que qui il elle dans pour pas au sur ne se plus"
              " par ce son sa ses avec est je vous nous mais ou lui leur sont était été avait"
              " comme tout bien aux cette me mon même sans fait dit être avoir qu où ces ont",
        "de": "der die und in den von zu das mit sich des auf für ist im dem nicht ein eine als"
              " auch es an werden aus er hat dass daß sie nach wird bei einer um am sind noch wie"
              " einem über einen so zum war haben nur oder aber vor zur bis mehr durch man ich du"
              " wir ihr mir mich dich sein seine wenn doch schon hatte wieder",
        "es": "de la que el en y a los del se las por un para con no una su al lo como más pero"
              " sus le ya o fue este ha sí porque esta son entre cuando muy sin sobre también me"
              " hasta hay donde quien desde todo nos había ni él ella yo mi tu te dijo esto eso"
              " estaba era les qué",
        "it": "di e il la che a per in un è non una le i del si da con della al lo come ma se"
              " nel ha gli dei più alla anche sono io mi ti ci ne o era suo sua questo quando poi"
              " perché così già ed dal nella delle degli quel quella chi tu lui lei noi voi loro"
              " dove sé fu ch",
        "pt": "de a o que e do da em um para é com não uma os no se na por mais as dos como mas"
              " foi ao ele das tem à seu sua ou ser quando muito há nos já está eu também só pelo"
              " pela até isso ela entre era depois sem mesmo aos ter seus quem nas me esse eles"
              " você tinha essa num nem suas meu às minha lhe lhes co",
        "nl": "de en van het een in is dat op te zijn voor met die niet aan er om ook als bij"
              " maar of uit door dan nog wat naar over hij ze zij zich was werd wordt hun haar ik"
              " je mij wij we u tot zoo zo had hebben heeft worden kan geen al onder na veel zal"
              " zou dit deze wel hem mijn uw toen nu daar hier waar want",
        "la": "et in est non ad cum ut quod qui quae sed ex de si per a ab esse sunt nec autem"
              " enim etiam hoc haec se sibi eius eorum quam atque ac aut neque vel iam tamen erat"
              " erant ne quoque inter ob post ante sub pro quibus quo ea id is suis suos sua"
              " suum omnibus omnes nihil ubi dum cuius apud eo eos ipse ille sese",
        "pl": "i w na z się nie do to że jest o a jak ale po co tak za od jego go ich już jej"
              " tylko przez by dla czy ze tego jeszcze bo mu on ona ja mnie ty był była było są"
              " może gdy kiedy też ten ta tym tej tu pan sobie bardzo teraz nic tam oraz przy u"
              " we pod nad",
        "fi": "ja on ei se että hän oli ole niin kuin mutta jo nyt kun tai sen ovat olla myös"
              " vaan sitä siitä mitä joka jotka minä sinä me te he mun sun min tuo tää nuo"
              " kanssa vielä jos sekä kaikki vain eikä mikä ollut olisi olen olet en et pois"
              " noin siellä täällä mi mik niin",
        "sv": "och i att det som en på är av för med till den har de inte om ett han men var"
              " jag sig från vi så kan man när hon under också efter eller nu sin där vid mot"
              " skulle kommer ut vara hade alla andra mycket än här då sedan över bara vad dem"
              " honom henne mig dig",
        "da": "og i at det en den til er som på de med han af for ikke der var mig sig men et"
              " har om vi min havde ham hun nu over da fra du ud sin dem os op man hans hvor"
              " eller hvad skal selv her alle vil blev kunne ind når være dog noget ville jo"
              " deres efter ned skulle denne end dette mit også",
        "hu": "a az és hogy nem is meg egy de van ez csak már még el azt ki volt mint mert ha"
              " ezt fel én te ő mi ti ők kell vagy lesz sem pedig most olyan úgy itt ott minden"
              " nagy után között alatt által mellett szerint nélkül",
        "eo": "la kaj de en al estas ne mi vi li ŝi ĝi ni ili por kun sed kiu kio tio ke el"
              " pri sur ĉe da je ol tiu ĉi se nur jam ankaŭ tre pli ĉiuj estis havas povas unu"
              " oni",
    }.items()
}
# fmt: on

_WORD = re.compile(r"[^\W\d_]+")

# (name, [(lo, hi), ...]) codepoint ranges of the scripts told apart by script alone.
_SCRIPTS: dict[str, tuple[tuple[int, int], ...]] = {
    "latin": ((0x41, 0x5A), (0x61, 0x7A), (0xC0, 0x24F), (0x1E00, 0x1EFF)),
    "cyrillic": ((0x400, 0x52F),),
    "greek": ((0x370, 0x3FF), (0x1F00, 0x1FFF)),
    "han": ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2FFFF)),
    "kana": ((0x3040, 0x30FF),),
    "hangul": ((0x1100, 0x11FF), (0xAC00, 0xD7AF)),
    "hebrew": ((0x590, 0x5FF),),
    "arabic": ((0x600, 0x6FF),),
    "devanagari": ((0x900, 0x97F),),
    "thai": ((0xE00, 0xE7F),),
}
_SCRIPT_LANGUAGE = {
    "greek": "el", "hangul": "ko", "hebrew": "he", "arabic": "ar", "devanagari": "hi", "thai": "th",
}  # fmt: skip


# Frequent characters whose traditional and simplified forms differ (pairs at the same index).
# Both scripts are ``zh`` to the clean stage; :func:`chinese_script` tells them apart.
_TRADITIONAL = "們個這來說時為會國對過學還開長見發現問點與麼東車書馬門話讓從氣聽頭誰樣當邊間裡"
_SIMPLIFIED = "们个这来说时为会国对过学还开长见发现问点与么东车书马门话让从气听头谁样当边间里"


def chinese_script(text: str, *, windows: int = 6, window_chars: int = 2000) -> str:
    """``Hant`` (traditional) or ``Hans`` (simplified), by which set of the paired frequent
    characters the sampled text uses more; ``und`` when it holds none of them."""
    sample = sample_windows(text, windows, window_chars)
    trad = sum(sample.count(c) for c in _TRADITIONAL)
    simp = sum(sample.count(c) for c in _SIMPLIFIED)
    if trad == simp == 0:
        return UNDETERMINED
    return "Hant" if trad > simp else "Hans"


class LanguageGuess(NamedTuple):
    """ISO 639-1 code (``und`` if undetermined) and a confidence in [0, 1]."""

    code: str
    confidence: float


def sample_windows(text: str, windows: int = 6, window_chars: int = 2000) -> str:
    """A few evenly spaced windows of ``text`` (between 5 % and 95 %), joined; whole short texts."""
    n = len(text)
    if n <= windows * window_chars * 2:
        return text
    lo, hi = int(n * 0.05), int(n * 0.95) - window_chars
    step = (hi - lo) / max(1, windows - 1)
    return "\n".join(
        text[int(lo + i * step) : int(lo + i * step) + window_chars] for i in range(windows)
    )


def _script_counts(sample: str) -> dict[str, int]:
    cp = np.frombuffer(sample.encode("utf-32-le"), dtype="<u4")
    counts = {}
    for name, ranges in _SCRIPTS.items():
        mask = np.zeros(cp.shape, dtype=bool)
        for lo, hi in ranges:
            mask |= (cp >= lo) & (cp <= hi)
        counts[name] = int(mask.sum())
    counts["latin"] -= sample.count("×") + sample.count("÷")
    return counts


def _cyrillic_language(sample: str, letters: int) -> str:
    """Russian, Ukrainian, Serbian/Macedonian or Bulgarian, from their distinctive letters."""
    low = sample.lower()

    def share(chars: str) -> float:
        return sum(low.count(c) for c in chars) / max(1, letters)

    if share("ыэ") >= 0.003:
        return "ru"
    if share("їєґ") >= 0.002:
        return "uk"
    if share("ђћџјљњ") >= 0.002:
        return "sr"
    return "bg"


def _stopword_scores(sample: str) -> dict[str, float]:
    """Share of the sample's words that are stopwords of each language."""
    counts = Counter(_WORD.findall(sample.lower()))
    total = sum(counts.values())
    if not total:
        return {}
    return {code: sum(counts.get(w, 0) for w in words) / total for code, words in STOPWORDS.items()}


def detect_language(text: str, *, windows: int = 6, window_chars: int = 2000) -> LanguageGuess:
    """Guess the language of ``text`` from a few sampled windows.

    Confidence: for script decisions, the share of letters in that script; for stopword
    decisions, ``1 - second_best / best`` (0 = a tie, 1 = no other profile matched at all),
    halved when the best hit rate is below the level real running text reaches.
    """
    sample = sample_windows(text, windows, window_chars)
    scripts = _script_counts(sample)
    letters = sum(scripts.values())
    if not letters:
        return LanguageGuess(UNDETERMINED, 0.0)
    script = max(scripts, key=lambda k: scripts[k])
    share = scripts[script] / letters
    if script == "han" or script == "kana":
        kana = scripts["kana"] / max(1, scripts["han"] + scripts["kana"])
        return LanguageGuess("ja" if kana > 0.05 else "zh", round(share, 3))
    if script == "cyrillic":
        return LanguageGuess(_cyrillic_language(sample, scripts["cyrillic"]), round(share, 3))
    if script != "latin":
        return LanguageGuess(_SCRIPT_LANGUAGE[script], round(share, 3))
    scores = _stopword_scores(sample)
    if not scores:
        return LanguageGuess(UNDETERMINED, 0.0)
    ranked = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
    (best, s1), (_, s2) = ranked[0], ranked[1]
    if s1 < MIN_STOPWORD_RATE / 3:
        return LanguageGuess(UNDETERMINED, 0.0)
    confidence = (1.0 - s2 / s1) * share
    if s1 < MIN_STOPWORD_RATE:
        confidence /= 2
    return LanguageGuess(best, round(confidence, 3))
