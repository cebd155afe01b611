"""Short news-style articles, each with a one-sentence summary, written for dsum (`data.source:
bundled-documents`): the shape of XSum (`document`, `summary`, `id`) at a size that trains on a laptop.

Every article is told from facts drawn by a seeded random generator (a town, a number, a name, a date),
its sentences in varying order with background sentences around them; the summary says the story's
gist in other words than the article does, as XSum's summaries do. Reproducible byte for byte:

    python -m dsum.sample.generate        # rewrites documents.jsonl with the other bundled sets
"""

from __future__ import annotations

import random
from collections.abc import Callable

N_DOCUMENTS = 200

TOWNS = (
    "Ashford Bexley Carlow Dunmore Elsworth Fairhaven Glenrock Harlow Inverby Kestwick Longmere Marston "
    "Northam Oakridge Pembury Queensferry Redcliff Stanmore Thornbury Upton Westmere Yarrow"
).split()
FIRST = "Anna Ben Clara David Eva Frank Grace Henry Iris James Karen Liam Nora Owen Paula Ravi Sara Tom".split()
LAST = "Ahmed Brennan Costa Dalton Evans Fischer Gallo Haddad Ito Jensen Kowalski Lopez Moreau Novak Okafor".split()
DAYS = ["on Monday", "on Tuesday", "on Wednesday", "on Thursday", "on Friday", "on Saturday", "on Sunday"]
MONTHS = "January February March April May June July August September October November December".split()

BACKGROUND = [
    "The town has a population of about {n} people.",
    "Local businesses have been asked to share their views.",
    "A public meeting is planned for next month.",
    "The decision follows months of discussion.",
    "Officials said further details would be published online.",
    "It is the first change of its kind in more than a decade.",
    "Residents were told about the plans in a letter last week.",
    "A spokesperson said the situation was being kept under review.",
    "The figures were published in an annual report.",
    "Similar schemes have been tried in other parts of the country.",
]


def _person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


Story = Callable[[random.Random], tuple[list[str], list[str]]]
"""rng -> (the article's fact sentences, phrasings of its one-sentence summary)."""


def council(rng):
    town, project = rng.choice(TOWNS), rng.choice(["skate park", "cycle lane", "library", "car park", "swimming pool"])
    yes, no = rng.randint(9, 20), rng.randint(2, 8)
    cost = rng.choice([2, 3, 4, 5, 7, 9, 12])
    who = _person(rng)
    facts = [
        f"Councillors in {town} voted {yes} to {no} {rng.choice(DAYS)} in favour of building a new {project}.",
        f"The {project} is expected to cost about £{cost}m and could open within two years.",
        "Some residents had objected, saying the money should be spent on repairing roads.",
        f"Council leader {who} said the {project} would make {town} a better place to live.",
    ]
    return facts, [
        f"Plans for a new {project} in {town} have been approved by councillors despite objections from residents.",
        f"A £{cost}m {project} will be built in {town} after councillors backed the plans.",
    ]


def storm(rng):
    town = rng.choice(TOWNS)
    name = rng.choice(["Agnes", "Bert", "Ciara", "Darragh", "Eunice", "Franklin", "Gerrit", "Henk"])
    homes, flights = rng.randint(2, 40) * 1000, rng.randint(12, 90)
    facts = [
        f"Storm {name} brought winds of up to {rng.randint(70, 100)} mph to {town} {rng.choice(DAYS)}.",
        f"About {homes:,} homes were left without power and {flights} flights were cancelled.",
        "Several roads were closed because of fallen trees.",
        "Forecasters have warned that more strong winds are expected later in the week.",
    ]
    return facts, [
        f"Thousands of homes in {town} lost power as Storm {name} brought strong winds and travel disruption.",
        f"Storm {name} has left {homes:,} homes without power and grounded flights in {town}.",
    ]


def match(rng):
    home, away = rng.sample(TOWNS, 2)
    a, b = rng.randint(2, 5), rng.randint(0, 1)
    scorer = _person(rng)
    facts = [
        f"{home} United beat {away} Rovers {a}-{b} in the cup final {rng.choice(DAYS)}.",
        f"{scorer} scored twice in the second half to settle the match.",
        f"It is the first trophy for {home} United in {rng.randint(8, 40)} years.",
        f"The {away} Rovers manager said his team had been beaten by the better side.",
    ]
    return facts, [
        f"{home} United won the cup final after a {a}-{b} victory over {away} Rovers.",
        f"Two second-half goals from {scorer} gave {home} United victory over {away} Rovers in the cup final.",
    ]


def results(rng):
    company = rng.choice(["Northwind Foods", "Brightline Energy", "Harbour Bank", "Vela Motors", "Copperleaf Homes"])
    pct, jobs = rng.randint(5, 40), rng.randint(2, 30) * 50
    up = rng.random() < 0.5
    boss = _person(rng)
    move = "rose" if up else "fell"
    facts = [
        f"{company} said its yearly profits {move} by {pct}%.",
        (
            f"The firm plans to hire {jobs} new staff over the next year."
            if up
            else f"The firm said it would cut {jobs} jobs to reduce costs."
        ),
        f"Chief executive {boss} said the results reflected a {'strong' if up else 'difficult'} year.",
        f"Shares in {company} {'climbed' if up else 'dropped'} after the announcement.",
    ]
    gist = f"create {jobs} jobs after a rise in profits" if up else f"cut {jobs} jobs after a fall in profits"
    return facts, [
        f"{company} is to {gist}.",
        f"{company} has reported a {pct}% {'rise' if up else 'fall'} in profits.",
    ]


def recall(rng):
    company = rng.choice(["Kettleworks", "Sunmark", "Tidy Home", "Arclight", "Brisk Toys"])
    product = rng.choice(["kettles", "phone chargers", "hair dryers", "children's scooters", "electric heaters"])
    units = rng.randint(5, 90) * 1000
    facts = [
        f"{company} has recalled {units:,} {product} because of a safety fault.",
        f"The company said a faulty part could cause the {product} to overheat.",
        "Customers have been told to stop using them and return them for a full refund.",
        f"No injuries have been reported, according to {company}.",
    ]
    return facts, [
        f"Thousands of {product} made by {company} are being recalled over fears they could overheat.",
        f"{company} is recalling {units:,} {product} after finding a safety fault.",
    ]


def discovery(rng):
    town = rng.choice(TOWNS)
    animal = rng.choice(["bees", "hedgehogs", "bats", "otters", "owls", "frogs", "butterflies"])
    finding = rng.choice(["can recognise human faces", "travel much further than thought", "sleep more in cities"])
    lead = _person(rng)
    facts = [
        f"Researchers at the University of {town} have found that {animal} {finding}.",
        f"The team studied {rng.randint(40, 400)} {animal} over {rng.randint(2, 6)} years.",
        f"Dr {lead}, who led the study, said the results were a surprise.",
        f"The findings could help efforts to protect {animal} in the wild.",
    ]
    return facts, [
        f"Scientists in {town} say they have discovered that {animal} {finding}.",
        f"A study by the University of {town} suggests {animal} {finding}.",
    ]


def fire(rng):
    town = rng.choice(TOWNS)
    building = rng.choice(["warehouse", "restaurant", "block of flats", "school", "hotel"])
    crews, hurt = rng.randint(4, 15), rng.randint(0, 3)
    facts = [
        f"A fire broke out at a {building} in {town} {rng.choice(DAYS)}.",
        f"{crews} fire crews were sent to the scene and the fire was under control by the evening.",
        (
            "Nobody was injured."
            if hurt == 0
            else f"{hurt} {'person was' if hurt == 1 else 'people were'} taken to hospital with minor injuries."
        ),
        "The cause of the fire is being investigated.",
    ]
    return facts, [
        f"Firefighters have tackled a large fire at a {building} in {town}.",
        f"An investigation has begun into the cause of a fire which badly damaged a {building} in {town}.",
    ]


def opening(rng):
    town = rng.choice(TOWNS)
    place, users = rng.choice(
        [("primary school", "pupils"), ("hospital wing", "patients"), ("sports centre", "members")]
    )
    n, cost = rng.randint(2, 9) * 100, rng.randint(3, 30)
    facts = [
        f"A new {place} has opened in {town} after {rng.randint(2, 4)} years of building work.",
        f"The £{cost}m {place} has room for {n} {users}.",
        f"Local MP {_person(rng)} cut the ribbon at the opening ceremony.",
        "The old building will be turned into homes.",
    ]
    return facts, [
        f"A £{cost}m {place} has opened its doors in {town}.",
        f"{town} has a new {place} with space for {n} {users}.",
    ]


def strike(rng):
    town = rng.choice(TOWNS)
    workers = rng.choice(["bus drivers", "train drivers", "refuse collectors", "nurses", "teachers"])
    days = rng.randint(2, 7)
    facts = [
        f"{workers.capitalize()} in {town} are to strike for {days} days in {rng.choice(MONTHS)} in a dispute over pay.",
        f"The union said {rng.randint(60, 95)}% of its members had voted for the action.",
        "Talks with employers broke down last week.",
        "Managers said they were disappointed and urged the union to return to talks.",
    ]
    return facts, [
        f"{workers.capitalize()} in {town} will walk out for {days} days after talks over pay failed.",
        f"A {days}-day strike by {workers} in {town} has been announced in a row over pay.",
    ]


def theft(rng):
    town = rng.choice(TOWNS)
    item = rng.choice(["painting", "statue", "vintage car", "gold medal", "rare book"])
    value = rng.randint(10, 500) * 1000
    facts = [
        f"Police in {town} are appealing for help after a {item} worth £{value:,} was stolen.",
        f"The {item} was taken from a museum {rng.choice(DAYS)} night.",
        "Officers believe the thieves knew what they were looking for.",
        "Anyone with information has been asked to contact police.",
    ]
    return facts, [
        f"A {item} worth £{value:,} has been stolen from a museum in {town}.",
        f"Police are searching for thieves who stole a valuable {item} from a {town} museum.",
    ]


def festival(rng):
    town = rng.choice(TOWNS)
    kind = rng.choice(["music", "food", "book", "film", "folk"])
    n = rng.randint(20, 95) * 1000
    facts = [
        f"A record {n:,} people attended the {town} {kind} festival this year.",
        f"Organisers said it was the busiest festival in its {rng.randint(5, 60)}-year history.",
        "Extra trains were laid on to help visitors get home.",
        "Next year's festival is expected to be even bigger.",
    ]
    return facts, [
        f"The {town} {kind} festival has attracted its biggest ever crowd.",
        f"Organisers of the {town} {kind} festival say a record {n:,} visitors came this year.",
    ]


def resignation(rng):
    town, who = rng.choice(TOWNS), _person(rng)
    reason = rng.choice(["health reasons", "family reasons", "a row over spending", "criticism of a housing plan"])
    facts = [
        f"The mayor of {town}, {who}, has resigned, citing {reason}.",
        f"{who.split()[0]} had been mayor for {rng.randint(2, 9)} years.",
        "A by-election will be held to choose a successor.",
        "Colleagues paid tribute to the mayor's work for the town.",
    ]
    return facts, [
        f"{who} has stepped down as mayor of {town}.",
        f"The mayor of {town} has quit because of {reason}.",
    ]


STORIES: list[Story] = [
    council,
    storm,
    match,
    results,
    recall,
    discovery,
    fire,
    opening,
    strike,
    theft,
    festival,
    resignation,
]


def _article(rng: random.Random, facts: list[str]) -> str:
    """The lead fact first, the others in varying order, background sentences among them."""
    body = facts[1:]
    rng.shuffle(body)
    extra = [s.format(n=f"{rng.randint(8, 90) * 1000:,}") for s in rng.sample(BACKGROUND, rng.randint(0, 3))]
    for sentence in extra:
        body.insert(rng.randint(0, len(body)), sentence)
    return " ".join([facts[0], *body])


def documents(n: int = N_DOCUMENTS, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        facts, summaries = STORIES[i % len(STORIES)](rng)
        rows.append({"id": f"doc-{i:04d}", "document": _article(rng, facts), "summary": rng.choice(summaries)})
    rng.shuffle(rows)
    return rows
