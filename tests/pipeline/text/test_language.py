"""Language identification: hand-written samples per language, then every book of the mirror."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from pipeline.text.boilerplate import strip_boilerplate
from pipeline.text.encoding import decode_text
from pipeline.text.language import UNDETERMINED, detect_language, sample_windows
from tests.conftest import MirrorBooks

SAMPLES = {
    "en": "It was late in the evening when the old man came back to the house, and he was so tired "
    "that he could not say a word to any of us. We gave him a chair by the fire and a cup of tea, "
    "and after a while he told us what he had seen on the road.",
    "fr": "Il était tard dans la soirée quand le vieil homme revint à la maison, et il était si "
    "fatigué qu'il ne pouvait pas dire un mot. Nous lui avons donné une chaise près du feu, et "
    "après un moment il nous a raconté ce qu'il avait vu sur la route.",
    "de": "Es war spät am Abend, als der alte Mann nach Hause kam, und er war so müde, dass er "
    "kein Wort sagen konnte. Wir gaben ihm einen Stuhl am Feuer und eine Tasse Tee, und nach "
    "einer Weile erzählte er uns, was er auf der Straße gesehen hatte.",
    "es": "Era tarde por la noche cuando el viejo volvió a la casa, y estaba tan cansado que no "
    "podía decir una palabra. Le dimos una silla junto al fuego y una taza de té, y después de "
    "un rato nos contó lo que había visto en el camino.",
    "it": "Era tardi la sera quando il vecchio tornò a casa, e era così stanco che non poteva "
    "dire una parola. Gli abbiamo dato una sedia vicino al fuoco e una tazza di tè, e dopo un "
    "po' ci ha raccontato quello che aveva visto per la strada.",
    "pt": "Era tarde da noite quando o velho voltou para a casa, e estava tão cansado que não "
    "podia dizer uma palavra. Demos-lhe uma cadeira junto ao fogo e uma chávena de chá, e "
    "depois de algum tempo ele contou-nos o que tinha visto na estrada.",
    "nl": "Het was laat op de avond toen de oude man naar huis kwam, en hij was zo moe dat hij "
    "geen woord kon zeggen. Wij gaven hem een stoel bij het vuur en een kop thee, en na een "
    "tijdje vertelde hij ons wat hij op de weg had gezien.",
    "la": "Erat sera vespera cum senex domum rediit, et tam fessus erat ut nihil dicere posset. "
    "Sellam ei ad ignem dedimus, et post tempus nobis narravit quae in via vidisset, quod "
    "omnes qui aderant et audiebant magno cum timore acceperunt.",
    "pl": "Było już późno wieczorem, kiedy stary człowiek wrócił do domu, i był tak zmęczony, że "
    "nie mógł powiedzieć ani słowa. Daliśmy mu krzesło przy ogniu i filiżankę herbaty, a po "
    "chwili opowiedział nam, co widział na drodze, i że już tam nie pójdzie.",
    "fi": "Oli jo myöhä ilta, kun vanha mies tuli kotiin, ja hän oli niin väsynyt, että ei voinut "
    "sanoa sanaakaan. Me annoimme hänelle tuolin tulen luona, ja kun hän oli hetken levännyt, "
    "hän kertoi mitä oli nähnyt tiellä, mutta se ei ollut kaikki.",
    "bg": "Беше късно вечерта, когато старецът се върна у дома, и беше толкова уморен, че не "
    "можеше да каже нито дума. Дадохме му стол до огъня и чаша чай.",
    "ru": "Было уже поздно вечером, когда старик вернулся домой, и он был так утомлён, что не "
    "мог сказать ни слова. Мы дали ему стул у огня и чашку чая, и это было хорошо.",
    "zh": "天色已晚，老人回到家中，疲倦得說不出話來。我們給他一把椅子，讓他坐在火邊，又給他一杯茶。",
    "ja": "夜も遅くなって、老人は家に帰ってきた。とても疲れていて、何も言えなかった。",
    "el": "Ήταν αργά το βράδυ όταν ο γέρος γύρισε στο σπίτι, και ήταν τόσο κουρασμένος.",
}


@pytest.mark.parametrize("code", sorted(SAMPLES))
def test_each_language_sample(code: str) -> None:
    guess = detect_language(SAMPLES[code])
    assert guess.code == code, guess
    assert 0.0 < guess.confidence <= 1.0


def test_guess_unpacks_as_a_tuple() -> None:
    code, confidence = detect_language(SAMPLES["en"] * 10)
    assert code == "en" and confidence > 0.6


def test_no_letters_is_undetermined() -> None:
    assert detect_language("1234 5678 -- ... 90").code == UNDETERMINED
    assert detect_language("").code == UNDETERMINED


def test_sampled_windows_cover_the_middle_not_the_front_matter() -> None:
    text = "x" * 100_000 + " the and of " * 50_000 + "y" * 100_000
    sample = sample_windows(text, windows=4, window_chars=1000)
    assert len(sample) < 5000
    assert detect_language(text).code == "en"


def test_english_with_a_foreign_preface_is_still_english() -> None:
    text = SAMPLES["fr"] + "\n\n" + SAMPLES["en"] * 40
    assert detect_language(text).code == "en"


@pytest.mark.mirror
def test_every_mirror_book_matches_its_catalog_language(
    mirror_dir: Path, mirror_books: MirrorBooks
) -> None:
    epub = mirror_dir / "gutenberg" / "cache" / "epub"
    catalog = pl.read_csv(epub / "feeds" / "pg_catalog.csv", infer_schema=False)
    wrong, checked = {}, set()
    for book_id, lang in catalog.select("Text#", "Language").iter_rows():
        body = strip_boilerplate(
            decode_text((epub / book_id / f"pg{book_id}.txt").read_bytes()).text
        )
        guess = detect_language(body.body)
        checked.add(int(book_id))
        if guess.code != lang:
            wrong[book_id] = (lang, guess)
    assert not wrong
    # Every book of the mirror was checked, the non-English ones included (whatever their number).
    assert checked == set(mirror_books.ids)
    foreign = mirror_books.not_in_language("en")
    assert foreign and {mirror_books.language(i) for i in foreign} >= {"fr", "de", "zh", "bg"}
