"""The built-in demo corpus: English -> Veshi, a small invented language, generated from a seed.

Veshi is made so that a translation model has real work to do, in the ways that make attention
interesting to look at:
- word order: English is subject-verb-object with prepositions; Veshi puts the verb last
  (subject, place, object, verb) and uses postpositions ("in the garden" -> "le horte ina");
- agreement: every noun has a class (-a or -e); articles and adjectives agree with it in class and
  number ("the big dogs" -> "lai drakai grandai"), and adjectives follow the noun;
- verbs carry tense and the subject's person and number ("vid-i-nt" = they saw), and subject
  pronouns are dropped, so the ending is all that is left of "they";
- English "does not / did not" moves tense to an auxiliary; Veshi puts "na" before the verb;
- "a" has no Veshi word, the object is marked by "ko", numbers follow the noun.
A third language, Ihsev (sv), is Veshi written backwards, each word and the order of the words, so
that one model can learn en<->vs and en<->sv and be asked for vs->sv, a direction it never saw
(zero-shot; configs/demo_multi.yaml). Everything here is written for mtkit; nothing is taken from
any corpus.
"""

import random
from pathlib import Path

from mtkit.errors import MtkitError
from mtkit.files import atomic_dir, write_text

SIZES = {"train": 30_000, "valid": 1_000, "test": 1_000}
SEED = 2026
LANGS = ("en", "vs", "sv")

# English singular, English plural, Veshi stem, noun class. Animate nouns can be subjects.
ANIMATE = """dog dogs drak a; cat cats mish e; horse horses kaval a; bird birds tirp e; fish fish pesk a;
child children nin e; woman women dam a; man men vir e; teacher teachers magist a; farmer farmers agrik e;
doctor doctors medik a; girl girls pwel e; boy boys garz a; king kings reks e; queen queens regin a;
friend friends amik e; neighbour neighbours vezin a; student students skol e; baker bakers forn a;
soldier soldiers milit e"""
THINGS = """house houses dom a; garden gardens hort e; tree trees arb a; river rivers flum e;
mountain mountains mont a; city cities urb e; village villages vik a; road roads kamin e;
bridge bridges pont a; table tables tabl e; book books libr a; letter letters epist e; apple apples pom a;
loaf loaves pan e; cake cakes tort a; ball balls bal e; car cars karr a; boat boats nav e;
window windows fenest a; door doors jan e"""
ADJECTIVES = """big grand; small pik; old vet; young jun; red rub; blue blav; green verd; white alb;
black nigr; happy fel; sad trist; tired fatig; quick rap; slow lent; tall alt; short kurt;
beautiful bel; strange strann; quiet kvet; loud sonor; heavy grav; new nov; warm kald; cold frig"""
# English base, third person singular, past; Veshi stem.
TRANSITIVE = """see sees saw vid; like likes liked am; find finds found trov; carry carries carried fer;
watch watches watched spekt; follow follows followed sekv; help helps helped juv; call calls called vok;
hold holds held ten; push pushes pushed puls; paint paints painted ping; wash washes washed lav;
buy buys bought emp; sell sells sold vend; open opens opened aper; read reads read leg;
build builds built struk; eat eats ate man; bring brings brought port; visit visits visited vizit"""
INTRANSITIVE = """sleep sleeps slept dorm; run runs ran kur; sing sings sang kant; dance dances danced salt;
laugh laughs laughed rid; wait waits waited atend; swim swims swam nat; walk walks walked ambul;
sit sits sat sed; work works worked labor; play plays played lud; cry cries cried plor"""
PREPOSITIONS = "in ina; on supa; near prope; under sub; behind post; with kum; beside lat"
ADVERBS = "quickly vitim; slowly lentim; again ankor; often spes; today hodi; together kunu"
NUMBERS = "two du; three tri; four kvar; five kink; six seks"
# English pronoun, person, plural?
PRONOUNS = [("I", 1, False), ("you", 2, False), ("he", 3, False), ("she", 3, False),
            ("we", 1, True), ("you all", 2, True), ("they", 3, True)]

ENDINGS = {("a", False): "a", ("a", True): "ai", ("e", False): "e", ("e", True): "en"}
ARTICLES = {("a", False): "la", ("a", True): "lai", ("e", False): "le", ("e", True): "len"}
PERSON = {(1, False): "m", (2, False): "s", (3, False): "t", (1, True): "mus", (2, True): "tis", (3, True): "nt"}


def _table(text: str) -> list[list[str]]:
    return [entry.split() for entry in text.replace("\n", " ").split(";")]


class Grammar:
    """Generates one (English, Veshi) sentence pair at a time from a random.Random."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.animate, self.things = _table(ANIMATE), _table(THINGS)
        self.adjectives, self.numbers = _table(ADJECTIVES), _table(NUMBERS)
        self.transitive, self.intransitive = _table(TRANSITIVE), _table(INTRANSITIVE)
        self.prepositions, self.adverbs = _table(PREPOSITIONS), _table(ADVERBS)

    def noun_phrase(self, nouns: list[list[str]]) -> tuple[list[str], list[str], bool]:
        """English words, Veshi words, plural?"""
        r = self.rng
        sg, pl, stem, cls = r.choice(nouns)
        kind = r.choices(["the", "a", "number", "bare"], weights=[50, 25, 15, 10])[0]
        plural = kind in ("number", "bare") or (kind == "the" and r.random() < 0.3)
        adjs = r.sample(self.adjectives, k=r.choices([0, 1, 2], weights=[50, 35, 15])[0])
        end = ENDINGS[cls, plural]
        en = [a[0] for a in adjs] + [pl if plural else sg]
        vs = [stem + end] + [a[1] + end for a in adjs]
        if kind == "the":
            en, vs = ["the"] + en, [ARTICLES[cls, plural]] + vs
        elif kind == "a":
            en = ["an" if en[0][0] in "aeiou" else "a"] + en  # Veshi has no indefinite article
        elif kind == "number":
            number = r.choice(self.numbers)
            en, vs = [number[0]] + en, vs + [number[1]]
        return en, vs, plural

    def clause(self) -> tuple[list[str], list[str]]:
        r = self.rng
        if r.random() < 0.3:
            pronoun, person, plural = r.choice(PRONOUNS)
            subj_en, subj_vs = pronoun.split(), []  # Veshi drops subject pronouns
        else:
            subj_en, subj_vs, plural = self.noun_phrase(self.animate)
            person = 3
        transitive = r.random() < 0.65
        base, third, past, stem = r.choice(self.transitive if transitive else self.intransitive)
        is_past, negated = r.random() < 0.4, r.random() < 0.15
        third_singular = person == 3 and not plural
        if negated:
            aux = "did" if is_past else ("does" if third_singular else "do")
            verb_en = [aux, "not", base]
        else:
            verb_en = [past if is_past else (third if third_singular else base)]
        verb_vs = (["na"] if negated else []) + [stem + ("i" if is_past else "e") + PERSON[person, plural]]
        obj_en, obj_vs = [], []
        if transitive:
            obj_en, obj_vs, _ = self.noun_phrase(self.animate + self.things)
            obj_vs = obj_vs + ["ko"]
        place_en, place_vs = [], []
        if r.random() < 0.35:
            prep, post = r.choice(self.prepositions)
            np_en, np_vs, _ = self.noun_phrase(self.things)
            place_en, place_vs = [prep] + np_en, np_vs + [post]
        adv_en, adv_vs = [], []
        if r.random() < 0.2:
            adverb, translation = r.choice(self.adverbs)
            adv_en, adv_vs = [adverb], [translation]
        en = subj_en + verb_en + obj_en + place_en + adv_en
        vs = adv_vs + subj_vs + place_vs + obj_vs + verb_vs
        return en, vs

    def sentence(self) -> tuple[str, str]:
        en, vs = self.clause()
        if self.rng.random() < 0.2:
            en2, vs2 = self.clause()
            en, vs = en + ["and"] + en2, vs + ["i"] + vs2
        return _finish(en), _finish(vs)


def _finish(words: list[str]) -> str:
    text = " ".join(words)
    return text[0].upper() + text[1:] + "."


def ihsev(veshi: str) -> str:
    """A Veshi sentence written backwards: "Le amike kvete ambulet." becomes "Telubma etevk ekima el."."""
    return _finish([word[::-1] for word in reversed(veshi.rstrip(".").lower().split())])


def generate(sizes: dict[str, int] = SIZES, seed: int = SEED) -> dict[str, list[tuple[str, str]]]:
    """Pairs per split. Test and valid sentences are distinct and never occur in train; train
    keeps the repeats that random generation makes (short sentences recur), as real corpora do."""
    grammar = Grammar(random.Random(seed))
    splits: dict[str, list[tuple[str, str]]] = {}
    held_out: set[str] = set()
    for split in ("test", "valid", "train"):
        pairs: list[tuple[str, str]] = []
        while len(pairs) < sizes[split]:
            en, vs = grammar.sentence()
            if en in held_out:
                continue
            if split != "train":
                held_out.add(en)
            pairs.append((en, vs))
        splits[split] = pairs
    return splits


def ensure_corpus(folder: Path) -> None:
    """Write {train,valid,test}.{en,vs,sv} into `folder` unless they are all there already (a
    corpus written before Ihsev existed gets its .sv files from its .vs files)."""
    folder = Path(folder)
    names = [f"{split}.{lang}" for split in SIZES for lang in LANGS]
    if all((folder / name).is_file() for name in names if not name.endswith(".sv")):
        for split in SIZES:
            if not (folder / f"{split}.sv").is_file():
                veshi = (folder / f"{split}.vs").read_text(encoding="utf-8").splitlines()
                write_text(folder / f"{split}.sv", "".join(ihsev(line) + "\n" for line in veshi))
        return
    if folder.exists() and any(folder.iterdir()):
        missing = [n for n in names if not (folder / n).is_file()]
        raise MtkitError(f"{folder} is not empty and lacks demo files {', '.join(missing)}",
                         hint="point data.dir at an empty or missing folder for the demo corpus")
    with atomic_dir(folder) as tmp:
        for split, pairs in generate().items():
            sides = {"en": [en for en, _ in pairs], "vs": [vs for _, vs in pairs], "sv": [ihsev(vs) for _, vs in pairs]}
            for lang in LANGS:
                (tmp / f"{split}.{lang}").write_text("".join(line + "\n" for line in sides[lang]), encoding="utf-8")
