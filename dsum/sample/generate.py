"""Write the bundled sample sets: dialogues with summaries, short reviews with sentiment labels, and
news-style articles with one-sentence summaries (dsum.sample.documents).

The dialogues are written for dsum: everyday scenarios (plans, errands, work, travel, health, ...)
with names, places, times and items drawn by a seeded random generator, so the shipped files are
reproducible byte for byte:

    python -m dsum.sample.generate        # rewrites dsum/sample/{dialogues,reviews,documents}.jsonl

Two speaker styles appear, as in public dialogue corpora: chat style (``Amanda: ...``) and tagged
style (``#Person1#: ...``), whose summaries refer to the speakers by their tags.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

from dsum.sample import documents

HERE = Path(__file__).parent
DIALOGUES = HERE / "dialogues.jsonl"
REVIEWS = HERE / "reviews.jsonl"
DOCUMENTS = HERE / "documents.jsonl"
N_DIALOGUES = 360
N_REVIEWS = 240
SEED = 20261124

NAMES = (
    "Amira Ben Carla Dev Elena Farid Greta Hiro Ines Jonas Kemi Luis Maya Nikolai Olga Pavel Quinn "
    "Rosa Sami Tara Ugo Vera Wen Ximena Yusuf Zoe Marta Oskar Leila Tomasz Priya Dmitri Hana Kofi "
    "Sofia Mateo Aisha Lars Noor Emeka Bianca Rafael Ingrid Tariq Mei Gustavo Freya Omar Lucia"
).split()

PLACES = [
    "the cafe on Elm Street",
    "the library",
    "the train station",
    "the park gate",
    "the office",
    "the gym",
    "the bakery",
    "the old cinema",
    "the bus stop",
    "the market square",
    "the museum",
    "the pizza place",
    "the harbour",
    "the community centre",
    "the bookshop",
    "the hotel lobby",
]
TIMES = ["8 am", "9:30", "10 am", "noon", "1 pm", "2:30", "4 pm", "5 pm", "6:30", "7 pm", "8 pm"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday", "tomorrow"]
FOODS = ["pizza", "sushi", "tacos", "a curry", "pasta", "burgers", "dumplings", "a salad", "soup"]
ITEMS = [
    "a laptop charger",
    "a blue umbrella",
    "the car keys",
    "a winter jacket",
    "the concert tickets",
    "a birthday cake",
    "a new phone",
    "the project report",
    "a pair of headphones",
    "a bike lock",
]
CITIES = ["Lisbon", "Oslo", "Kyoto", "Nairobi", "Lima", "Prague", "Montreal", "Hanoi", "Seville", "Tbilisi"]
TOPICS = [
    "the budget",
    "the new website",
    "the quarterly report",
    "the hiring plan",
    "the client demo",
    "the office move",
    "the product launch",
    "the training course",
]
SYMPTOMS = ["a sore throat", "a bad headache", "back pain", "a cough", "a sprained ankle", "a fever"]
PETS = ["dog", "cat", "rabbit", "parrot", "hamster"]
CHORES = ["the dishes", "the laundry", "the shopping", "the vacuuming", "the recycling", "the bathroom"]
BOOKS = ["a mystery novel", "a cookbook", "a history of jazz", "a travel guide", "a sci-fi trilogy"]
SPORTS = ["football", "tennis", "basketball", "badminton", "volleyball", "table tennis"]
APPLIANCES = ["the washing machine", "the fridge", "the heating", "the dishwasher", "the oven"]

GREETINGS = [
    ("Hi!", "Hey, what's up?"),
    ("Hello, do you have a minute?", "Sure, go ahead."),
    ("Hey there.", "Hi! Good to hear from you."),
    ("Morning!", "Good morning."),
]
SMALL_TALK = [
    ("How was your weekend?", "Quiet, mostly. I slept a lot."),
    ("Did you see the weather forecast?", "Yes, rain again all week."),
    ("How is your sister doing?", "She's fine, busy with her new job."),
    ("Are you still learning the guitar?", "A little, when I find the time."),
    ("Have you finished that series?", "Almost, two episodes left."),
    ("Is your cold better?", "Much better, thanks for asking."),
    ("Did you move into the new flat?", "Yes, last week. Still boxes everywhere."),
    ("How's work these days?", "Busy, but fine."),
]
CLOSINGS = [
    ("Great, see you then!", "See you!"),
    ("Thanks a lot.", "No problem."),
    ("Perfect.", "Bye!"),
    ("Okay, talk later.", "Later!"),
]


def _pick(rng: random.Random, seq):
    return seq[rng.randrange(len(seq))]


# Each scenario returns (turns, summary); a turn is (speaker index, text). In summaries, {0}, {1}, {2}
# stand for the speakers' names or tags.
Scenario = Callable[[random.Random], tuple[list[tuple[int, str]], str]]


def meet_up(rng):
    place, time, day = _pick(rng, PLACES), _pick(rng, TIMES), _pick(rng, DAYS)
    turns = [
        (0, f"Are you free on {day}?"),
        (1, "I think so. Why?"),
        (0, "Let's meet up, it's been ages."),
        (1, "Good idea. Where?"),
        (0, f"How about {place}?"),
        (1, "Fine. What time?"),
        (0, f"{time}?"),
        (1, f"{time} at {place} works for me."),
    ]
    return turns, f"{{0}} and {{1}} will meet at {place} at {time} on {day}."


def lost_item(rng):
    item, place = _pick(rng, ITEMS), _pick(rng, PLACES)
    turns = [
        (0, f"Have you seen {item}? I can't find it anywhere."),
        (1, "When did you last have it?"),
        (0, f"Yesterday, at {place}."),
        (1, f"Then you probably left it at {place}."),
        (0, "Oh no. Could you check if they still have it?"),
        (1, "I'll call them and let you know."),
    ]
    return turns, f"{{0}} lost {item} at {place}. {{1}} will call {place} to ask about it."


def order_food(rng):
    food, time = _pick(rng, FOODS), _pick(rng, TIMES[6:])
    turns = [
        (0, "I'm starving. Shall we order something tonight?"),
        (1, "Yes please, I don't want to cook."),
        (0, f"What about {food}?"),
        (1, f"{food.capitalize()} sounds great."),
        (0, f"I'll order for {time} then."),
        (1, "I'll pay this time."),
    ]
    return turns, f"{{0}} will order {food} for {time}, and {{1}} will pay."


def doctor(rng):
    symptom, day = _pick(rng, SYMPTOMS), _pick(rng, DAYS)
    turns = [
        (0, "What seems to be the problem?"),
        (1, f"I've had {symptom} for three days."),
        (0, "Have you taken anything for it?"),
        (1, "Only some painkillers, but they didn't help much."),
        (0, "I'll prescribe something stronger. Rest as much as you can."),
        (1, "Should I come back?"),
        (0, f"Yes, come back on {day} if it's not better."),
    ]
    return (
        turns,
        f"{{1}} has had {symptom} for three days. {{0}} prescribes medicine and asks {{1}} to come back on {day} if it does not improve.",
    )


def work_meeting(rng):
    topic, day, time = _pick(rng, TOPICS), _pick(rng, DAYS[:5]), _pick(rng, TIMES)
    turns = [
        (0, f"We need to talk about {topic}."),
        (1, "Is there a problem?"),
        (0, "Not yet, but the deadline is close."),
        (1, f"Let's set up a meeting on {day}."),
        (0, f"{day} at {time}?"),
        (1, "Okay, I'll send an invite to the team."),
    ]
    return turns, f"{{0}} and {{1}} will meet on {day} at {time} to discuss {topic}. {{1}} will invite the team."


def travel(rng):
    city, day = _pick(rng, CITIES), _pick(rng, DAYS[:7])
    nights = rng.choice(["two", "three", "four", "five"])
    turns = [
        (0, f"I booked the flight to {city}!"),
        (1, "Finally! When do you leave?"),
        (0, f"On {day}. I'll stay {nights} nights."),
        (1, "Where are you staying?"),
        (0, "A small hotel near the centre."),
        (1, "Send me photos!"),
        (0, "Of course."),
    ]
    return turns, f"{{0}} is flying to {city} on {day} for {nights} nights and will send {{1}} photos."


def birthday(rng):
    day, place = _pick(rng, DAYS), _pick(rng, PLACES)
    gift = _pick(rng, BOOKS + ["a plant", "a scarf", "a board game", "a mug"])
    turns = [
        (0, f"It's {{2}}'s birthday on {day}."),
        (1, "I almost forgot! What should we get?"),
        (0, f"Maybe {gift}?"),
        (1, "Good idea. Let's split the cost."),
        (0, f"Deal. The party is at {place}."),
        (1, "I'll be there."),
    ]
    return turns, f"{{0}} and {{1}} will buy {gift} for {{2}}'s birthday on {day} and go to the party at {place}."


def pet_sitting(rng):
    pet, city, nights = _pick(rng, PETS), _pick(rng, CITIES), rng.choice(["a week", "the weekend", "four days"])
    turns = [
        (0, f"Could you look after my {pet} while I'm in {city}?"),
        (1, "Sure. For how long?"),
        (0, f"Just {nights}."),
        (1, "No problem. What does it eat?"),
        (0, "I'll leave the food and instructions on the table."),
        (1, "Okay, bring the keys on your way."),
    ]
    return turns, f"{{1}} will look after {{0}}'s {pet} for {nights} while {{0}} is in {city}."


def chores(rng):
    a, b = rng.sample(CHORES, 2)
    turns = [
        (0, "The flat is a mess."),
        (1, "I know, sorry. I was busy all week."),
        (0, f"Can you do {a} today?"),
        (1, f"Yes, if you do {b}."),
        (0, "Fair enough."),
    ]
    return turns, f"{{1}} will do {a} and {{0}} will do {b}."


def late(rng):
    minutes = rng.choice(["10", "15", "20", "30", "45"])
    place = _pick(rng, PLACES)
    reason = rng.choice(
        ["the bus broke down", "there is a lot of traffic", "I missed the train", "my meeting ran late"]
    )
    turns = [
        (0, "Where are you? We're all waiting."),
        (1, f"Sorry, {reason}."),
        (0, "How long will you be?"),
        (1, f"About {minutes} minutes."),
        (0, f"Okay, we'll wait at {place}."),
    ]
    cause = reason.replace("I missed", "{1} missed").replace("my meeting", "{1}'s meeting")
    return turns, f"{{1}} will be {minutes} minutes late because {cause}. The others will wait at {place}."


def sport(rng):
    sport, day, time = _pick(rng, SPORTS), _pick(rng, DAYS), _pick(rng, TIMES)
    turns = [
        (0, f"Do you want to play {sport} on {day}?"),
        (1, "I'd love to, but I don't have the gear."),
        (0, "You can borrow mine."),
        (1, "Great. What time?"),
        (0, f"Let's say {time}."),
        (1, "I'll be there."),
    ]
    return turns, f"{{0}} and {{1}} will play {sport} on {day} at {time}. {{0}} will lend {{1}} the gear."


def repair(rng):
    appliance, day = _pick(rng, APPLIANCES), _pick(rng, DAYS)
    turns = [
        (0, f"{appliance.capitalize()} stopped working again."),
        (1, "Did you call the landlord?"),
        (0, "Twice. Nobody answers."),
        (1, "I know a repairman. He's cheap and quick."),
        (0, "Can you give me his number?"),
        (1, f"I'll text it to you. He could come on {day}."),
    ]
    return (
        turns,
        f"{appliance.capitalize()} at {{0}}'s place is broken. {{1}} will send {{0}} the number of a repairman who could come on {day}.",
    )


def book_club(rng):
    book, day = _pick(rng, BOOKS), _pick(rng, DAYS)
    turns = [
        (0, f"Did you finish {book} for the book club?"),
        (1, "Not yet, I'm halfway."),
        (0, f"The meeting is on {day}."),
        (1, "I'll finish it by then."),
        (2, "I didn't like the ending, by the way."),
        (1, "No spoilers!"),
    ]
    return (
        turns,
        f"{{1}} is halfway through {book} and will finish it before the book club on {day}. {{2}} did not like the ending.",
    )


def borrow_money(rng):
    amount = rng.choice(["20", "50", "100", "30", "80"])
    day = _pick(rng, DAYS)
    turns = [
        (0, f"Could you lend me {amount} euros?"),
        (1, "What happened?"),
        (0, "I forgot my wallet at home."),
        (1, "Sure, I'll transfer it now."),
        (0, f"Thanks, I'll pay you back on {day}."),
    ]
    return turns, f"{{1}} lends {{0}} {amount} euros because {{0}} forgot the wallet. {{0}} will pay it back on {day}."


def shopping(rng):
    a, b = rng.sample(FOODS + ["milk", "bread", "eggs", "apples", "coffee"], 2)
    turns = [
        (0, "I'm at the supermarket. Do we need anything?"),
        (1, f"We're out of {a}."),
        (0, "Anything else?"),
        (1, f"Maybe {b}, too."),
        (0, "Got it."),
    ]
    return turns, f"{{0}} is at the supermarket and will buy {a} and {b} for {{1}}."


def job_interview(rng):
    topic, day, time = _pick(rng, TOPICS), _pick(rng, DAYS[:5]), _pick(rng, TIMES[:6])
    turns = [
        (0, "Thank you for coming in. Tell me about your last job."),
        (1, f"I led the team working on {topic}."),
        (0, "What was the hardest part?"),
        (1, "Keeping everyone on schedule."),
        (0, f"Thank you. We'd like to invite you for a second interview on {day} at {time}."),
        (1, "That would be great."),
    ]
    return turns, f"{{1}} has a job interview with {{0}} and is invited to a second interview on {day} at {time}."


def movie_night(rng):
    day, food = _pick(rng, DAYS), _pick(rng, FOODS)
    genre = rng.choice(["a comedy", "a horror film", "a documentary", "an old western", "a cartoon"])
    turns = [
        (0, f"Movie night on {day}?"),
        (1, "Yes! What are we watching?"),
        (0, f"I was thinking {genre}."),
        (2, f"Fine by me. I'll bring {food}."),
        (1, "Perfect."),
    ]
    return turns, f"{{0}}, {{1}} and {{2}} will watch {genre} on {day}. {{2}} will bring {food}."


def pick_up(rng):
    item, place = _pick(rng, ITEMS), _pick(rng, PLACES)
    turns = [
        (0, f"Can you pick up {item} on your way home?"),
        (1, "Sure, where is it?"),
        (0, f"At {place}."),
    ]
    return turns, f"{{1}} will pick up {item} from {place} for {{0}}."


def call_back(rng):
    topic, time = _pick(rng, TOPICS), _pick(rng, TIMES)
    turns = [
        (0, f"Call me when you're free, it's about {topic}."),
        (1, f"Will do, after {time}."),
        (0, "Thanks."),
    ]
    return turns, f"{{1}} will call {{0}} after {time} about {topic}."


SCENARIOS: list[Scenario] = [
    pick_up,
    call_back,
    meet_up,
    lost_item,
    order_food,
    doctor,
    work_meeting,
    travel,
    birthday,
    pet_sitting,
    chores,
    late,
    sport,
    repair,
    book_club,
    borrow_money,
    shopping,
    job_interview,
    movie_night,
]


def _pad(rng: random.Random, turns: list[tuple[int, str]], target: int) -> list[tuple[int, str]]:
    """Add greetings, small talk and closings around the core turns until about ``target`` turns."""
    turns = list(turns)
    if target > len(turns) and rng.random() < 0.8:
        g = _pick(rng, GREETINGS)
        turns = [(0, g[0]), (1, g[1])] + turns
    for pair in rng.sample(SMALL_TALK, len(SMALL_TALK)):
        if len(turns) + 2 > target:
            break
        turns = turns[:2] + [(0, pair[0]), (1, pair[1])] + turns[2:]
    if target > len(turns):
        c = _pick(rng, CLOSINGS)
        turns += [(0, c[0]), (1, c[1])]
    while len(turns) < target:  # long dialogues: the speakers confirm the plan again
        turns.append((len(turns) % 2, rng.choice(["Okay.", "Sounds good.", "Right.", "Sure.", "Great."])))
    return turns[:30]


def _render(rng: random.Random, scenario: Scenario, tagged: bool) -> dict[str, str]:
    turns, summary = scenario(rng)
    n_speakers = 1 + max(s for s, _ in turns)
    n_speakers = max(n_speakers, 3 if "{2}" in summary or any("{2}" in t for _, t in turns) else 2)
    target = rng.choice([len(turns)] * 3 + list(range(len(turns), 31)))
    turns = _pad(rng, turns, target)
    if tagged:
        speakers = [f"#Person{i + 1}#" for i in range(n_speakers)]
    else:
        speakers = rng.sample(NAMES, n_speakers)
    lines = [f"{speakers[s]}: {text.format(*speakers)}" for s, text in turns]
    return {"dialogue": "\n".join(lines), "summary": summary.format(*speakers)}


def dialogues(n: int = N_DIALOGUES, seed: int = SEED) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        scenario = SCENARIOS[i % len(SCENARIOS)]
        row = _render(rng, scenario, tagged=rng.random() < 0.4)
        rows.append({"id": f"dsum-{i:04d}", **row})
    rng.shuffle(rows)
    return rows


POSITIVE = [
    "a warm, funny and beautifully acted film",
    "the best thing I have seen all year",
    "clever writing and a moving ending",
    "great music and a cast that clearly had fun",
    "I laughed from start to finish",
    "gorgeous photography and a story that stays with you",
]
NEGATIVE = [
    "a dull, slow and forgettable film",
    "the worst two hours I have spent in a cinema",
    "a silly plot and wooden acting",
    "loud, confusing and far too long",
    "I nearly fell asleep halfway through",
    "a lazy script with no surprises at all",
]
OPENERS = ["Honestly,", "In short:", "My verdict:", "Well,", "To be fair,", ""]
SUBJECTS = ["this movie", "the sequel", "this drama", "the new comedy", "this thriller", "the remake"]


def reviews(n: int = N_REVIEWS, seed: int = SEED) -> list[dict[str, object]]:
    rng = random.Random(seed + 1)
    rows = []
    for i in range(n):
        label = i % 2
        phrases = rng.sample(POSITIVE if label else NEGATIVE, 2)
        text = f"{_pick(rng, OPENERS)} {_pick(rng, SUBJECTS)} is {phrases[0]}; {phrases[1]}.".strip()
        text = text[0].upper() + text[1:]
        rows.append({"id": f"review-{i:04d}", "text": text, "label": label})
    rng.shuffle(rows)
    return rows


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def write_all(out_dir: Path = HERE) -> list[Path]:
    """Write every bundled set into out_dir (the package's own folder by default)."""
    sets = {
        DIALOGUES.name: dialogues(),
        REVIEWS.name: reviews(),
        DOCUMENTS.name: documents.documents(seed=SEED + 2),
    }
    for name, rows in sets.items():
        _write(out_dir / name, rows)
    return [out_dir / name for name in sets]


def main() -> None:
    print("wrote " + ", ".join(str(p) for p in write_all()))


if __name__ == "__main__":
    main()
