"""Train the small demo tokenizer, data/tokenizer.model, with the PaliGemma id scheme.

Builds: ``data/tokenizer.model``. Takes under 1 s. Deterministic: fixed seed,
one SentencePiece thread; ``--check`` rebuilds it in memory and compares bytes.

The official PaliGemma tokenizer has 257,152 pieces: the 256,000 Gemma pieces,
then ``<loc0000>``..``<loc1023>`` and ``<seg000>``..``<seg127>`` as the last 1152
ids. The demo tokenizer keeps that scheme with a base of 1024 pieces:

    id      piece
    0       <pad>
    1       <eos>
    2       <bos>
    3       <unk>
    4       "\\n"                  a dedicated piece, as in Gemma (id 108 there)
    5..260  <0x00>..<0xFF>        byte fallback: any text encodes without <unk>
    ..1023  learned BPE pieces    ("caption", "▁circle", "▁red", ...)
    1024+i  <loc{i:04d}>          i in [0, 1024)
    2048+j  <seg{j:03d}>          j in [0, 128)

SentencePiece training puts user-defined pieces right after the special ones,
never last (spec pitfall 20), so the base model is trained first and the 1152
pieces are appended to its ModelProto as USER_DEFINED pieces afterwards -- what
big_vision does on the fly for ``gemma(tokensets=("loc", "seg"))``.

The training text is generated here, offline and deterministically (fixed seed,
one thread): sentences about the synthetic shapes data, the task prompts, and a
few hundred plain English sentences. Re-running gives the same bytes.

    python scripts/make_tokenizer.py            # writes data/tokenizer.model
    python scripts/make_tokenizer.py --check    # exit 1 if the file is not up to date

Needs ``protobuf`` (already installed with flax/orbax) to edit the ModelProto.
"""

from __future__ import annotations

import argparse
import io
import random
import sys
from pathlib import Path

import sentencepiece as spm

from pali_kit.atomic import write_bytes
from pali_kit.vocab import pieces

BASE_VOCAB = 1024
SEED = 0
OUT = Path(__file__).resolve().parent.parent / "data" / "tokenizer.model"

# The 35 language codes of big_vision's COCO-35L config; appear in prompts.
LANGS = (
    "ar bn cs da de el en es fa fi fil fr he hi hr hu id it ja ko mi nl no pl "
    "pt ro ru sv sw te th tr uk vi zh"
).split()

SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow")
SIZES = ("small", "large", "big", "tiny", "medium")
POSITIONS = (
    "left", "right", "top", "bottom", "middle", "center", "top left", "top right",
    "bottom left", "bottom right",
)  # fmt: skip
NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve",
)  # fmt: skip

# Plain English, mostly short image captions and questions, so that common
# words get their own pieces.
ENGLISH = """\
A man riding a bike down a city street.
A woman holding an umbrella in the rain.
Two dogs playing with a ball in the park.
A cat sleeping on a soft couch.
A plate of food with rice, meat and vegetables.
A group of people standing around a table.
A red car parked next to a building.
A bus driving down the road on a sunny day.
A little boy flying a kite on the beach.
A girl eating a slice of pizza.
An old clock tower in the middle of town.
A train coming down the tracks.
A bowl of fresh fruit on a wooden table.
Three people sitting on a bench near the water.
A kitchen with white cabinets and a black stove.
A bathroom with a sink, a mirror and a toilet.
A bedroom with a large bed and two lamps.
A living room with a television and a brown sofa.
A young man playing tennis on a court.
A baseball player swinging a bat.
A surfer riding a big wave in the ocean.
A skier going down a snowy hill.
A horse standing in a green field.
A herd of cows grazing on the grass.
An elephant walking through the tall grass.
A giraffe eating leaves from a tree.
A zebra standing next to a fence.
A bird sitting on a branch.
A flock of birds flying over the lake.
A boat floating on a calm river.
An airplane flying in the blue sky.
A stop sign on the corner of the street.
A traffic light showing red.
A fire hydrant on the sidewalk.
A person walking a dog on a leash.
A child brushing her teeth.
A woman cutting a cake with a knife.
A man talking on his phone.
A laptop computer on a desk next to a cup of coffee.
A keyboard and a mouse on a table.
A teddy bear sitting on a chair.
A vase with yellow flowers.
A pair of scissors on a sheet of paper.
A sandwich and a glass of orange juice.
A hot dog with mustard and onions.
A donut with pink frosting.
A man and a woman smiling at the camera.
A crowd of people watching a game.
A street sign pointing to the station.
A motorcycle parked in front of a shop.
A truck carrying wood along the highway.
A small boat tied to the dock.
Snow covers the mountains in the distance.
The sun is setting behind the hills.
The sky is clear and bright.
It is raining outside and the road is wet.
The water is calm and blue.
The room is dark except for a small lamp.
The table is covered with books and papers.
The door is open and the light is on.
The window looks out over the garden.
The children are playing in the yard.
The dog is running after a ball.
The cat is looking out of the window.
The man is wearing a black jacket and a hat.
The woman has long brown hair.
The boy is holding a blue balloon.
The girl is wearing a white dress.
The baby is sleeping in a crib.
The old man is reading a newspaper.
The chef is cooking in a busy kitchen.
The players are wearing red shirts.
The car is parked on the side of the road.
The bicycle is leaning against the wall.
The building has many windows.
The bridge crosses a wide river.
The street is full of cars and people.
The market sells fruit and vegetables.
The shelf is full of old books.
The picture shows a quiet village.
This is a photo of a busy airport.
This image shows a close up of a flower.
There is a tree in front of the house.
There are two chairs next to the table.
There are many people on the beach.
There is a cup of tea on the desk.
There is nothing on the plate.
There is a sign with white letters.
There are clouds in the sky.
There are four wheels on the car.
What is the man holding?
What is the woman wearing?
What color is the car?
What colour is the sky?
What time is it on the clock?
What animal is in the picture?
What is on the table?
What is the name of the street?
What is written on the sign?
What sport are they playing?
What is the weather like?
Where is the dog?
Where are the people going?
Where is this photo taken?
Who is standing next to the door?
Which hand is he using?
How many people are in the picture?
How many birds are there?
How many cars are on the road?
How old is the child?
How big is the room?
Is the light on?
Is it day or night?
Is there a person in the image?
Are there any animals?
Are the people happy?
Does the man have a beard?
Can you see the sun?
Why is the road wet?
Yes, there is.
No, there is not.
Yes.
No.
Maybe.
I do not know.
I think it is a cat.
It looks like a small house.
It is on the left side of the picture.
It is on the right side of the table.
It is at the top of the image.
It is at the bottom of the page.
It is in the center of the room.
The ball is under the chair.
The lamp is above the bed.
The box is below the window.
The cup is between the plate and the book.
The tree is behind the house.
The car is in front of the store.
The picture is next to the mirror.
The keys are inside the bag.
The shoes are outside the door.
Please describe the image in detail.
Write a short caption for this picture.
Answer the question about the photo.
Read the text in the image.
Find the objects and draw a box around each one.
Describe what you see.
Count the number of objects.
Name the color of each shape.
One, two, three, four, five.
Six, seven, eight, nine, ten.
The first one is red and the second one is blue.
The last one is the largest.
The smaller one is on top.
The larger one is at the bottom.
Both of them are green.
None of them are yellow.
All of the shapes are the same color.
Some of the shapes are different sizes.
Each shape has a different color.
Every circle is round.
A square has four equal sides.
A triangle has three sides and three corners.
The circle is bigger than the square.
The square is smaller than the triangle.
The triangle is pointing up.
The shapes do not overlap.
The shapes are spread across the image.
The background is plain and white.
The background is dark gray.
A black and white photo of a city.
A colorful painting of a garden.
A drawing of a house with a red roof.
A map of the world on the wall.
A screenshot of a web page.
A chart showing sales over time.
A table with numbers and names.
A page from a book with a picture.
A poster for a music festival.
A receipt from a grocery store.
The total is 12 dollars and 50 cents.
The meeting starts at 9 in the morning.
The store opens at 10 and closes at 6.
The train leaves in 15 minutes.
The temperature today is 21 degrees.
The year was 1999.
Call us at 555 0123.
Page 3 of 10.
Chapter 1: The Beginning.
Welcome to the museum.
Open every day from Monday to Friday.
No parking on this side of the street.
Exit only.
Please keep off the grass.
Thank you for your visit.
We went to the park on Sunday.
She likes to read books in the evening.
He walks to school every morning.
They are going to the beach next week.
I would like a cup of coffee, please.
Can you help me find the station?
The weather was cold but sunny.
My friend has a big brown dog.
Our house is near the river.
Their car is old but it still runs well.
This is the best pizza in town.
That was a long and difficult day.
We need to buy milk, bread and eggs.
The movie was funny and a little sad.
The music was loud and the room was crowded.
It took us two hours to get there.
The cat jumped onto the table and knocked over a glass.
After lunch we walked along the river.
Before dinner she called her mother.
The students listened carefully to the teacher.
The doctor said he should rest for a few days.
The garden is full of roses in the summer.
In the winter the lake freezes over.
The leaves turn yellow and red in the fall.
Spring is the season of new flowers.
A large crowd gathered in the square.
The small shop on the corner sells fresh bread.
The view from the top of the hill is beautiful.
The road goes up the mountain and then down to the sea.
A light rain fell all afternoon.
The stars were bright in the night sky.
The city is quiet early in the morning.
The waves crashed against the rocks.
A long line of people waited outside.
The baby smiled and waved her hand.
The team won the game by three points.
The runner crossed the finish line first.
The plane landed safely at the airport.
The phone rang twice and then stopped.
He opened the box and found a letter inside.
She painted the walls light blue.
The old bridge was built over a hundred years ago.
Turn left at the next street and then go straight.
The museum is on the right, across from the park.
Put the red block on top of the green one.
Move the blue circle to the bottom right corner.
The yellow square is in the top left corner.
The green triangle is in the middle of the picture.
"""


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _plural(shape: str, n: int) -> str:
    return shape if n == 1 else shape + "s"


def _shape_lines(rng: random.Random) -> list[str]:
    """Captions, questions and answers about 1-3 coloured shapes."""
    shape, color, size = rng.choice(SHAPES), rng.choice(COLORS), rng.choice(SIZES)
    pos = rng.choice(POSITIONS)
    n = rng.randint(1, 3)
    objs = [f"{rng.choice(COLORS)} {rng.choice(SHAPES)}" for _ in range(n)]
    listed = ", ".join(f"{_article(o)} {o}" for o in objs[:-1])
    listed = f"{listed} and a {objs[-1]}" if listed else f"a {objs[-1]}"
    count = rng.choice((str(n), NUMBER_WORDS[n]))
    return [
        f"{_article(size)} {size} {color} {shape}",
        f"{_article(color)} {color} {shape} on the {pos}",
        f"{_article(size)} {size} {color} {shape} in the {pos}",
        listed,
        f"{count} {_plural('shape', n)}: {listed}",
        f"there {'is' if n == 1 else 'are'} {count} {_plural('shape', n)} in the image",
        f"the {shape} is {color}",
        f"the {color} {shape} is at the {pos}",
        f"the {shape} is {size}",
        f"{count} {color} {_plural(shape, n)}",
        "how many shapes are there",
        f"how many {shape}s are there",
        f"how many {color} shapes are there",
        f"what color is the {shape}",
        f"what colour is the {shape}",
        f"what shape is {color}",
        f"where is the {color} {shape}",
        f"is there {_article(color)} {color} {shape}",
        f"what is on the {pos}",
        "which shape is the largest",
        f"{shape} ; {rng.choice(SHAPES)}",
        f"{color} {shape} ; {rng.choice(COLORS)} {rng.choice(SHAPES)}",
        rng.choice((color, shape, pos, count, "yes", "no", NUMBER_WORDS[rng.randint(0, 12)])),
    ]


def _prompt_lines(rng: random.Random) -> list[str]:
    """The task prompts (prefixes) of the demo data and of PaliGemma."""
    shape, color = rng.choice(SHAPES), rng.choice(COLORS)
    lang = rng.choice(("en", "en", "en", rng.choice(LANGS)))
    objs = " ; ".join(rng.sample(SHAPES, rng.randint(1, 3)))
    return [
        f"caption {lang}",
        f"describe {lang}",
        f"cap {lang}",
        "ocr",
        f"answer {lang} how many shapes are there",
        f"answer {lang} how many {shape}s are there",
        f"answer {lang} what color is the {shape}",
        f"answer {lang} where is the {color} {shape}",
        f"question {lang} {color}",
        f"question {lang} {rng.randint(0, 9)}",
        f"detect {objs}",
        f"segment {objs}",
        f"detect {color} {shape}",
        f"segment {shape}",
    ]


def corpus(seed: int = SEED) -> list[str]:
    """Training sentences: synthetic shapes text and prompts, then plain English."""
    rng = random.Random(seed)
    lines: list[str] = []
    for _ in range(600):
        lines += _shape_lines(rng)
        lines += _prompt_lines(rng)
    lines += [f"caption {lang}" for lang in LANGS] + [f"answer {lang}" for lang in LANGS]
    lines += [str(i) for i in range(100)] + list(NUMBER_WORDS)
    english = ENGLISH.splitlines()
    lines += english * 3 + [s.lower().rstrip(".?") for s in english]
    lines += [w.upper() for w in SHAPES + COLORS] + [w.title() for w in SHAPES + COLORS]
    return lines


def train_base(lines: list[str], vocab_size: int = BASE_VOCAB) -> bytes:
    """A Gemma-like BPE model (ids 0-3 pad/eos/bos/unk, "\\n" piece, byte fallback)."""
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=out,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,  # unseen characters become <0xNN> pieces, never <unk>
        split_digits=True,  # as Gemma: "1023" -> 1 0 2 3
        normalization_rule_name="identity",  # keep text (and "\n") as is
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=["\n"],  # "\n" is always exactly one piece
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        num_threads=1,  # deterministic
        minloglevel=2,
    )
    return out.getvalue()


def append_loc_seg(model_bytes: bytes) -> bytes:
    """Append <loc0000>..<loc1023>, <seg000>..<seg127> as the last USER_DEFINED pieces."""
    from sentencepiece import sentencepiece_model_pb2 as pb  # needs protobuf

    model = pb.ModelProto.FromString(model_bytes)
    names = pieces()
    for name in names:
        model.pieces.add(piece=name, score=0.0, type=pb.ModelProto.SentencePiece.USER_DEFINED)
    return model.SerializeToString()


def build(seed: int = SEED) -> bytes:
    """The bytes of data/tokenizer.model."""
    return append_loc_seg(train_base(corpus(seed)))


def _summary(model_bytes: bytes) -> str:
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    lines = [f"{len(model_bytes):,} bytes, {sp.vocab_size()} pieces"]
    for text in ("caption en", "\n", "a red circle on the left", "detect circle ; square"):
        ids = sp.encode(text)
        lines.append(f"  {text!r:30} -> {ids} {[sp.id_to_piece(i) for i in ids]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"default {OUT}")
    parser.add_argument("--check", action="store_true", help="only compare with --out")
    args = parser.parse_args(argv)
    data = build()
    if args.check:
        same = args.out.exists() and args.out.read_bytes() == data
        print(f"{args.out}: {'up to date' if same else 'DIFFERS from a fresh build'}")
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(args.out, data)
    print(f"wrote {args.out}: {_summary(data)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
