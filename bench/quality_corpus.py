"""Synthetic domain corpora for bench/quality.py, spoken by espeak-ng; made on demand into a cache folder.

    python bench/quality_corpus.py travel --out ~/.cache/whisper-ft/quality [--seed 0]

Each corpus is a folder of `<split>.csv` manifests (path,text) with their 16-kHz WAV clips in clips/:

| split | what | voices |
|---|---|---|
| train | domain sentences: the corpus's invented names in its training sentence shapes | three training voices |
| heldout | domain sentences never trained on: the same shapes, other name and number combinations | the training voices |
| unseen | the domain's names in sentence shapes never trained on | a fourth voice, never trained on |
| general | plain English the base model already handles, none of the domain's words | a fifth voice, never trained on |
| replay | other plain English sentences, for replaying general speech during training: its own dataset, `replay/train.csv` | the training voices |

The names are invented, so the base model cannot know them and the gain on `unseen` is learned, not recalled.
Which names and numbers go into which sentence is drawn from `random.Random(seed)`: the same seed and espeak-ng
version give the same corpus. A corpus is rebuilt only when its folder lacks the marker of this exact content
(`corpus.json`: the seed and a hash of the sentences and voices).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SAMPLE_RATE = 16_000
LAYOUT = 2  # raised whenever the folder's layout changes, so an older corpus is rebuilt
# (espeak-ng voice, words per minute). Training and held-out sentences rotate over the first three; unseen
# shapes and general speech each have a voice of their own that no training clip uses.
TRAIN_VOICES = [("en-gb+m1", 150), ("en-us+f2", 145), ("en-gb-x-rp+m3", 165)]
UNSEEN_VOICE = ("en-us+m7", 155)
GENERAL_VOICE = ("en-us+f3", 150)

NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
TIMES = ["six fifteen", "seven forty", "eight o'clock", "nine thirty", "ten twenty", "eleven fifty",
         "noon", "two forty five", "four ten", "five thirty"]

CORPORA = {
    # Invented place names in a railway's announcements.
    "travel": {
        "names": ["Tashku", "Velmora", "Quenbridge", "Drossel Point", "Ambrecht", "Ostravin", "Kelvadro",
                  "Nimbaru", "Sarrowgate", "Fennick Hollow", "Ulmsted", "Paravelle", "Grisholm", "Zantorra"],
        "train": [
            "The next train to {a} departs from platform {n}.",
            "Passengers for {a} please change at {b}.",
            "This service calls at {a}, {b} and {c}.",
            "The {t} service to {a} is delayed by {n} minutes.",
            "We are now approaching {a}, where this train terminates.",
            "Please mind the gap when leaving the train at {a}.",
            "The replacement bus for {a} leaves from outside the station.",
            "Tickets to {a} are not valid on the express to {b}.",
            "The train now standing at platform {n} is for {a}.",
            "Change here for connections to {a} and {b}.",
        ],
        "unseen": [
            "My grandmother grew up in {a} and later moved to {b}.",
            "Is it a long walk from {a} to {b}?",
            "We spent a rainy weekend in {a} last spring.",
            "The best bakery I know is just outside {a}.",
            "Have you ever been to {a}?",
            "She drove from {a} to {b} without stopping once.",
            "I lost my umbrella somewhere near {a}.",
            "The museum in {a} is closed on Mondays.",
        ],
    },
    # Invented drug names in a clinic's notes and instructions.
    "clinic": {
        "names": ["Zorvatine", "Pelmacort", "Quixaprin", "Dravolex", "Mentrazol", "Hylocept", "Brevistat",
                  "Catrovan", "Ulvemide", "Sorbafen", "Trelazine", "Nexidrol", "Vorimab", "Lestorin"],
        "train": [
            "Take {n} tablets of {a} each morning with food.",
            "The patient was switched from {a} to {b} last week.",
            "Please refill the {a} prescription for {n} days.",
            "Do not take {a} together with {b}.",
            "The dose of {a} was reduced to {n} milligrams.",
            "Stop the {a} if the rash comes back.",
            "She has been on {a} and {b} since the spring.",
            "Give {a} at {t} and again before bed.",
            "The nurse will check your blood pressure before the {a} injection.",
            "Ask the pharmacist whether {a} can replace {b}.",
        ],
        "unseen": [
            "My brother says {a} makes him sleepy.",
            "Is {a} safe to use during a long flight?",
            "I forgot to bring my {a} on holiday.",
            "Why does {a} taste so bitter?",
            "The old bottle of {a} expired in March.",
            "Could {a} be the reason for my headaches?",
            "We read an article about {a} and {b} in the paper.",
            "He keeps his {a} in the kitchen drawer.",
        ],
    },
}

# Plain English with none of the corpora's words: what the base model already transcribes well.
GENERAL = [
    "The weather was warm enough to eat outside.", "He put the keys on the table by the door.",
    "We need to buy milk, bread and a dozen eggs.", "The children played in the garden until dark.",
    "Could you turn the music down a little?", "She has worked at the library for ten years.",
    "The meeting has been moved to Thursday afternoon.", "I think it is going to rain later today.",
    "Please write your name at the top of the page.", "The dog barked at every car that went past.",
    "They painted the kitchen a pale shade of green.", "My phone battery is almost empty.",
    "The river was too cold for swimming.", "He reads the newspaper every morning over coffee.",
    "We walked along the beach as the sun went down.", "The shop on the corner sells fresh flowers.",
    "Can you remind me to call my sister tonight?", "The film was longer than we expected.",
    "She planted tomatoes and beans in the spring.", "There is a small hole in my left shoe.",
    "The teacher asked the class to open their books.", "Our neighbours are moving to a bigger house.",
    "I would like a cup of tea with a little milk.", "The bridge was closed for repairs all summer.",
    "He forgot his coat at the restaurant again.", "The baby finally fell asleep after lunch.",
    "We watched the birds building a nest in the tree.", "The price of apples has gone up this year.",
    "She wrote a long letter to her old friend.", "The lights went out during the storm.",
    "Please close the window before you leave.", "The bus was full so we decided to walk.",
    "He fixed the bicycle with an old spanner.", "The soup needs a little more salt.",
    "They spent the whole afternoon cleaning the car.", "I left my glasses somewhere in the kitchen.",
    "The garden looks lovely after the rain.", "We are having fish and potatoes for dinner.",
    "The old clock in the hall stopped at midnight.", "She laughed so hard that she started to cry.",
]
REPLAY = [
    "The cat slept on the warm windowsill all day.", "He carried the heavy boxes up the stairs.",
    "We should leave early to avoid the traffic.", "The apples in the bowl are still green.",
    "She sang quietly while she washed the dishes.", "The town has a market every Saturday.",
    "My cousin is learning to play the piano.", "The paint on the fence is starting to peel.",
    "He ordered a sandwich and a glass of water.", "The path through the woods was muddy.",
    "I need a new pair of boots for the winter.", "The kettle is on, so the tea will be ready soon.",
    "They built a snowman in the front yard.", "The letter arrived three days late.",
    "She keeps her plants by the sunny window.", "We found an old map in the attic.",
    "The students were quiet during the exam.", "He always takes the stairs instead of the lift.",
    "The bakery opens at seven every morning.", "Please pass me the salt and the pepper.",
    "The wind blew the leaves across the lawn.", "My grandfather tells the same jokes every year.",
    "The road was blocked by a fallen tree.", "I cannot find the remote control anywhere.",
    "They celebrated her birthday with a big cake.", "The lake was calm and perfectly still.",
    "He wrote the number on the back of his hand.", "The doctor's office is on the second floor.",
    "We listened to the radio on the long drive home.", "The towels are in the cupboard by the bathroom.",
    "She ran to catch the train but missed it.", "The puppy chewed one of my slippers.",
    "The stars were bright over the quiet village.", "He painted a picture of the harbour.",
    "We ate strawberries sitting on the grass.", "The window cleaner comes once a month.",
    "My watch is five minutes slow.", "The farmer fed the chickens before breakfast.",
    "There is a spider in the corner of the bath.", "The hotel room had a view of the hills.",
    "She borrowed a ladder from the man next door.", "The orchestra played until late in the evening.",
    "He keeps a diary of everything he eats.", "The tram stops right outside our office.",
    "I put the leftovers in the fridge.", "The sky turned orange as the sun set.",
    "They swam across the pond and back.", "The library books are due on Friday.",
    "She tied a red ribbon around the present.", "The shed at the bottom of the garden is locked.",
    "We played cards until the candles burned down.", "The chairs are stacked in the corner of the hall.",
    "He whistled as he walked down the lane.", "The tomatoes are finally turning red.",
    "My aunt sent us a postcard from the seaside.", "The floor creaks when you step near the door.",
    "They waited an hour for the ferry.", "The printer has run out of paper again.",
    "She wore her brother's old jacket to school.", "The soup was too hot to eat straight away.",
]


def sentences(spec: dict, shapes: list[str], n: int, rng: random.Random, avoid: set[str]) -> list[str]:
    """n distinct sentences: shape, names, numbers and times drawn from rng; none of them in `avoid`."""
    out, tries = [], 0
    while len(out) < n:
        tries += 1
        if tries > 100 * n:
            raise SystemExit(f"quality_corpus: cannot draw {n} distinct sentences from {len(shapes)} shapes")
        a, b, c = rng.sample(spec["names"], 3)
        text = rng.choice(shapes).format(a=a, b=b, c=c, n=rng.choice(NUMBERS), t=rng.choice(TIMES))
        if text not in avoid and text not in out:
            out.append(text)
    return out


def plan(corpus: str, seed: int, n_train: int = 180, n_eval: int = 40) -> dict[str, list[tuple[str, tuple]]]:
    """split -> [(sentence, (voice, speed))], all drawn from `seed`."""
    spec, rng = CORPORA[corpus], random.Random(f"{corpus}|{seed}")
    train = sentences(spec, spec["train"], n_train, rng, set())
    heldout = sentences(spec, spec["train"], n_eval, rng, set(train))  # same shapes, combinations never trained on
    unseen = sentences(spec, spec["unseen"], n_eval, rng, set())
    rotate = lambda texts, offset=0: [(t, TRAIN_VOICES[(i + offset) % len(TRAIN_VOICES)]) for i, t in enumerate(texts)]
    return {"train": rotate(train), "heldout": rotate(heldout, 1), "unseen": [(t, UNSEEN_VOICE) for t in unseen],
            "general": [(t, GENERAL_VOICE) for t in GENERAL[:n_eval]], "replay": rotate(REPLAY)}


def fingerprint(corpus: str, seed: int, splits: dict) -> str:
    return hashlib.sha256(json.dumps([corpus, seed, SAMPLE_RATE, splits], sort_keys=True).encode()).hexdigest()[:16]


def speak(text: str, voice: str, speed: int, out: Path, tmp: Path) -> None:
    """espeak-ng -> 16-kHz mono 16-bit WAV (espeak-ng writes 22.05 kHz; resampled with soxr as training does)."""
    import numpy as np
    import soundfile as sf
    import soxr

    raw = tmp / "raw.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(raw), text], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    audio, rate = sf.read(raw, dtype="float32")
    audio = soxr.resample(audio, rate, SAMPLE_RATE) if rate != SAMPLE_RATE else audio
    peak = float(np.abs(audio).max()) or 1.0
    sf.write(out, (0.9 / peak) * audio, SAMPLE_RATE, subtype="PCM_16")


def build(corpus: str, out: Path, seed: int = 0, say=print) -> Path:
    """The corpus folder out/<corpus>-seed<seed>, built unless it is already there with this exact content."""
    if corpus not in CORPORA:
        raise SystemExit(f"quality_corpus: unknown corpus {corpus!r}; choose from {', '.join(CORPORA)}")
    if shutil.which("espeak-ng") is None:
        raise SystemExit("quality_corpus: espeak-ng not found; install it (apt-get install -y espeak-ng)")
    splits = plan(corpus, seed)
    marker = {"corpus": corpus, "layout": LAYOUT, "seed": seed, "fingerprint": fingerprint(corpus, seed, splits),
              "clips": {s: len(v) for s, v in splits.items()}}
    folder = out / f"{corpus}-seed{seed}"
    if (folder / "corpus.json").is_file() and json.loads((folder / "corpus.json").read_text()) == marker:
        return folder
    if folder.exists():
        if not (folder / "corpus.json").is_file():  # never delete a folder this script did not write
            raise SystemExit(f"quality_corpus: {folder} exists and was not written by this script; choose another --out")
        shutil.rmtree(folder)
    say(f"quality_corpus: speaking {sum(len(v) for v in splits.values())} clips of {corpus} (seed {seed}) into {folder}")
    work = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(work, ignore_errors=True)
    (work / "clips").mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        for split, items in splits.items():
            # replay is a dataset of its own (replay/train.csv), so that it can be named as a training source
            home, manifest = (work / "replay", "train.csv") if split == "replay" else (work, f"{split}.csv")
            (home / "clips").mkdir(parents=True, exist_ok=True)
            rows = []
            for i, (text, (voice, speed)) in enumerate(items):
                name = f"clips/{split}-{i:04d}.wav"
                speak(text, voice, speed, home / name, Path(tmp))
                rows.append((name, text))
            with open(home / manifest, "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(["path", "text"])
                writer.writerows(rows)
    (work / "corpus.json").write_text(json.dumps(marker, indent=1) + "\n")
    work.rename(folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("corpus", nargs="+", choices=sorted(CORPORA))
    p.add_argument("--out", type=Path, default=Path.home() / ".cache" / "whisper-ft" / "quality")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for corpus in args.corpus:
        print(build(corpus, args.out.expanduser(), args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
