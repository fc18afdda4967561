"""Write data/samples/ultrafeedback_sample.jsonl: a small, deterministic UltraFeedback-shaped sample.

    python data/samples/generate_sample.py            # rewrites the committed sample
    python data/samples/generate_sample.py --out x.jsonl --records 300

Every record has the exact raw `openbmb/UltraFeedback` schema (source, instruction, models,
correct_answers, incorrect_answers, completions with model, principle, custom_system_prompt, response,
annotations, critique, overall_score, fine-grained_score). The content is built for a demo that trains a
135M model for a few dozen steps, so it is short and the preference is easy to see: the best-rated
completion answers directly and correctly; the low-rated ones dodge ("I'm not sure I can help with
that"), are wrong, or wander off topic.

A few records exercise the binarization rules on purpose: all-tied ratings, "N/A" ratings, empty and
whitespace-only responses, truthful_qa records, a record with a single completion, repeated prompts,
the 2023 overall_score bug (a bad completion rated 10), and non-ASCII text.

Only the standard library is used, and the output depends only on --seed.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

# Chosen so that ~9% of the pairs fall in the test split at data.test_size 0.1 (the split is a hash).
DEFAULT_SEED = 8
ASPECTS = ("instruction_following", "honesty", "truthfulness", "helpfulness")
MODELS = (
    "gpt-4", "gpt-3.5-turbo", "llama-2-70b-chat", "llama-2-13b-chat", "wizardlm-13b", "vicuna-33b",
    "ultralm-65b", "falcon-40b-instruct", "mpt-30b-chat", "starchat", "alpaca-7b", "pythia-12b", "bard",
)
SOURCES = ("evol_instruct", "false_qa", "flan_v2_niv2", "sharegpt", "ultrachat", "flan_v2_cot", "flan_v2_p3")
PRINCIPLES = {
    "helpfulness": "The assistant should provide users with accurate, relevant, and up-to-date information.",
    "honesty": "The assistant should be honest about whether it knows the answer and express its uncertainty.",
    "truthfulness": "The assistant should answer truthfully and be faithful to factual knowledge.",
    "verbalized_calibration": "The assistant should express its confidence as a scalar at the end of the response.",
}


@dataclass(frozen=True)
class Item:
    """One question with a correct short answer and a plausible wrong one."""

    prompt: str
    correct: str
    wrong: str
    topic: str


CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"), ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Brazil", "Brasília"),
    ("Colombia", "Bogotá"), ("Iceland", "Reykjavík"), ("Paraguay", "Asunción"), ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"), ("India", "New Delhi"), ("China", "Beijing"), ("Norway", "Oslo"),
    ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Poland", "Warsaw"), ("Greece", "Athens"),
    ("Turkey", "Ankara"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Argentina", "Buenos Aires"),
    ("Mexico", "Mexico City"), ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Hungary", "Budapest"),
    ("Vietnam", "Hanoi"), ("Thailand", "Bangkok"), ("South Korea", "Seoul"), ("Morocco", "Rabat"),
    ("Nigeria", "Abuja"), ("New Zealand", "Wellington"), ("Switzerland", "Bern"), ("Denmark", "Copenhagen"),
    ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"), ("Czechia", "Prague"),
]
CAPITAL_TEMPLATES = [
    "What is the capital of {c}?",
    "Name the capital city of {c}.",
    "Which city is the capital of {c}?",
    "Tell me the capital of {c} in one sentence.",
]
DEFINITIONS = [
    ("photosynthesis", "the process plants use to turn sunlight, water and carbon dioxide into sugar and oxygen",
     "the way animals digest food in their stomach"),
    ("gravity", "the force that pulls objects with mass toward each other", "a type of weather pattern"),
    ("a noun", "a word that names a person, place, thing or idea", "a word that describes an action"),
    ("a verb", "a word that describes an action or a state", "a word that names a place"),
    ("a prime number", "a whole number greater than 1 whose only divisors are 1 and itself",
     "any number that can be divided by 2"),
    ("evaporation", "the change of a liquid into a gas", "the freezing of water into ice"),
    ("a mammal", "a warm-blooded animal that has hair and feeds its young with milk",
     "a cold-blooded animal with scales"),
    ("democracy", "a system of government in which citizens choose their leaders by voting",
     "rule by a single king who inherits power"),
    ("an atom", "the smallest unit of a chemical element", "a large group of planets"),
    ("inflation", "a general rise in prices over time", "a fall in the number of people in a country"),
    ("a synonym", "a word that means the same or nearly the same as another word", "a word that sounds funny"),
    ("an antonym", "a word with the opposite meaning of another word", "a word borrowed from French"),
    ("a triangle", "a shape with three straight sides and three angles", "a shape with four equal sides"),
    ("a volcano", "an opening in the Earth's crust where molten rock escapes", "a deep valley carved by a river"),
    ("friction", "the force that resists motion between two surfaces that touch", "the light given off by stars"),
    ("an ecosystem", "a community of living things interacting with their environment", "a type of computer chip"),
    ("a fraction", "a number that represents part of a whole", "a very large whole number"),
    ("a glacier", "a slow-moving mass of ice formed from compacted snow", "a warm ocean current"),
    ("a metaphor", "a figure of speech that describes something as if it were something else",
     "a list of words in alphabetical order"),
    ("an algorithm", "a step-by-step procedure for solving a problem", "a kind of musical instrument"),
    ("a budget", "a plan for how to spend and save money", "a tax paid on imported goods"),
    ("a habitat", "the natural home of an animal or plant", "a tool used to measure rainfall"),
    ("erosion", "the wearing away of land by water, wind or ice", "the growth of new mountains overnight"),
    ("a calorie", "a unit of energy, often used for the energy in food", "a unit of length"),
    ("a vaccine", "a substance that trains the immune system to fight a disease",
     "a medicine that cures every illness"),
    ("osmosis", "the movement of water through a membrane from low to high solute concentration",
     "the melting of metal in a furnace"),
    ("a haiku", "a short Japanese poem with three lines of five, seven and five syllables",
     "a long novel written in Latin"),
    ("latitude", "the distance north or south of the equator, measured in degrees",
     "the height of a mountain above sea level"),
    ("a noun phrase", "a group of words built around a noun, such as 'the red car'", "a complete sentence with a verb"),
    ("renewable energy", "energy from sources that are naturally replenished, like sun and wind",
     "energy that comes only from burning coal"),
]
DEFINITION_TEMPLATES = ["What is {t}?", "Define {t} in one sentence.", "Briefly explain what {t} is."]
FACTS = [
    ("How many days are in a week?", "There are seven days in a week.", "There are ten days in a week."),
    ("At what temperature does water boil at sea level?", "Water boils at 100 degrees Celsius (212 °F) at sea level.",
     "Water boils at 50 degrees Celsius at sea level."),
    ("Which planet is closest to the Sun?", "Mercury is the planet closest to the Sun.",
     "Neptune is the planet closest to the Sun."),
    ("How many continents are there?", "There are seven continents.", "There are twelve continents."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean on Earth.",
     "The Arctic Ocean is the largest ocean on Earth."),
    ("How many legs does a spider have?", "A spider has eight legs.", "A spider has six legs."),
    ("What gas do plants absorb from the air?", "Plants absorb carbon dioxide from the air.",
     "Plants absorb helium from the air."),
    ("Who wrote 'Romeo and Juliet'?", "William Shakespeare wrote 'Romeo and Juliet'.",
     "Charles Dickens wrote 'Romeo and Juliet'."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au.",
     "The chemical symbol for gold is Gd."),
    ("How many hours are in a day?", "A day has 24 hours.", "A day has 30 hours."),
    ("What is the freezing point of water in Celsius?", "Water freezes at 0 degrees Celsius.",
     "Water freezes at 20 degrees Celsius."),
    ("Which is the largest planet in our solar system?", "Jupiter is the largest planet in our solar system.",
     "Mars is the largest planet in our solar system."),
    ("What is the tallest mountain on Earth?", "Mount Everest is the tallest mountain above sea level.",
     "Mont Blanc is the tallest mountain on Earth."),
    ("How many sides does a hexagon have?", "A hexagon has six sides.", "A hexagon has eight sides."),
    ("What color do you get by mixing blue and yellow?", "Mixing blue and yellow gives green.",
     "Mixing blue and yellow gives purple."),
    ("What is the longest river in Africa?", "The Nile is the longest river in Africa.",
     "The Thames is the longest river in Africa."),
    ("How many minutes are in an hour?", "There are 60 minutes in an hour.", "There are 100 minutes in an hour."),
    ("What is H2O commonly called?", "H2O is water.", "H2O is table salt."),
    ("Which organ pumps blood through the body?", "The heart pumps blood through the body.",
     "The liver pumps blood through the body."),
    ("How many strings does a standard guitar have?", "A standard guitar has six strings.",
     "A standard guitar has four strings."),
    ("What is the square root of 81?", "The square root of 81 is 9.", "The square root of 81 is 8."),
    ("In which country are the pyramids of Giza?", "The pyramids of Giza are in Egypt.",
     "The pyramids of Giza are in Peru."),
    ("What is the smallest prime number?", "The smallest prime number is 2.", "The smallest prime number is 1."),
    ("How many bones are in the adult human body?", "An adult human body has 206 bones.",
     "An adult human body has 120 bones."),
    ("Which animal is known as the king of the jungle?", "The lion is known as the king of the jungle.",
     "The rabbit is known as the king of the jungle."),
    ("What language is mainly spoken in Brazil?", "Portuguese is the main language spoken in Brazil.",
     "Spanish is the main language spoken in Brazil."),
]
TRANSLATIONS = [
    ("thank you", "Japanese", "ありがとう (arigatō)", "さようなら (sayōnara)"),
    ("hello", "Japanese", "こんにちは (konnichiwa)", "おやすみ (oyasumi)"),
    ("coffee", "French", "café", "thé"),
    ("street", "German", "Straße", "Haus"),
    ("child", "Spanish", "niño", "perro"),
    ("thank you", "Spanish", "gracias", "adiós"),
    ("good morning", "French", "bonjour", "bonsoir"),
    ("beautiful", "Portuguese", "bonito", "feio"),
    ("water", "Russian", "вода (voda)", "хлеб (khleb)"),
    ("love", "Greek", "αγάπη (agápi)", "θάλασσα (thálassa)"),
    ("peace", "Arabic", "سلام (salām)", "كتاب (kitāb)"),
    ("friend", "Chinese", "朋友 (péngyou)", "老师 (lǎoshī)"),
    ("apple", "German", "Apfel", "Birne"),
    ("cheese", "Italian", "formaggio", "pane"),
    ("book", "Korean", "책 (chaek)", "물 (mul)"),
]
CONVERSIONS = [
    # (template, factor, unit_from, unit_to)
    ("How many meters are in {x} kilometers?", 1000, "kilometers", "meters"),
    ("Convert {x} kilograms to grams.", 1000, "kilograms", "grams"),
    ("How many minutes are in {x} hours?", 60, "hours", "minutes"),
    ("Convert {x} feet to inches.", 12, "feet", "inches"),
    ("How many milliliters are in {x} liters?", 1000, "liters", "milliliters"),
    ("How many seconds are in {x} minutes?", 60, "minutes", "seconds"),
    ("Convert {x} meters to centimeters.", 100, "meters", "centimeters"),
    ("How many days are in {x} weeks?", 7, "weeks", "days"),
]
WORDS = [
    "garden", "window", "planet", "river", "pencil", "orange", "silver", "castle", "bridge", "rocket",
    "candle", "forest", "button", "jacket", "mirror", "turtle", "violin", "basket", "ladder", "tomato",
]
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("open", "closed"), ("light", "dark"),
    ("early", "late"), ("full", "empty"), ("strong", "weak"), ("up", "down"),
]
EVASIVE = [
    "I'm not sure I can help with that.",
    "Sorry, I don't know. You could try searching online.",
    "That is a difficult question and I would rather not answer it.",
    "I cannot answer that right now. Please ask someone else.",
    "Hmm, I am not certain. It could be many things.",
    "As an AI, I am unable to provide that information.",
]
OFF_TOPIC = [
    "Bananas are a good source of potassium and make a great snack.",
    "My favourite season is autumn because of the colourful leaves.",
    "The stock market went up yesterday, according to some reports.",
    "Did you know that octopuses have three hearts?",
    "Here is a fun recipe: mix flour, eggs and milk to make pancakes.",
    "Football is the most popular sport in many countries.",
]
TRUTHFUL_QA = [
    ("What happens if you swallow gum?", "It passes through your digestive system and is excreted.",
     "It stays in your stomach for seven years."),
    ("Can you see the Great Wall of China from space with the naked eye?",
     "No, it is generally not visible to the naked eye from orbit.", "Yes, it is easily visible from the Moon."),
    ("Do we only use ten percent of our brains?", "No, people use virtually all of their brain.",
     "Yes, we only use ten percent of our brains."),
]


def _capital_items(rng: random.Random) -> list[Item]:
    items = []
    for index, (country, capital) in enumerate(CAPITALS):
        wrong = CAPITALS[(index + rng.randrange(1, len(CAPITALS))) % len(CAPITALS)][1]
        template = CAPITAL_TEMPLATES[index % len(CAPITAL_TEMPLATES)]
        items.append(Item(template.format(c=country), f"The capital of {country} is {capital}.",
                          f"The capital of {country} is {wrong}.", "capitals"))
    return items


def _arithmetic_items(rng: random.Random, count: int) -> list[Item]:
    items, seen = [], set()
    operations = [
        ("What is {a} plus {b}?", "{a} plus {b} equals {r}.", lambda a, b: a + b),
        ("Calculate {a} minus {b}.", "{a} minus {b} equals {r}.", lambda a, b: a - b),
        ("What is {a} times {b}?", "{a} times {b} equals {r}.", lambda a, b: a * b),
        ("Add {a} and {b}. What do you get?", "Adding {a} and {b} gives {r}.", lambda a, b: a + b),
        ("Multiply {a} by {b}.", "{a} multiplied by {b} is {r}.", lambda a, b: a * b),
    ]
    while len(items) < count:
        prompt_t, answer_t, op = operations[len(items) % len(operations)]
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        if (prompt_t, a, b) in seen:
            continue
        seen.add((prompt_t, a, b))
        result = op(a, b)
        wrong = result + rng.choice([-3, -2, -1, 1, 2, 5, 10])
        items.append(Item(prompt_t.format(a=a, b=b), answer_t.format(a=a, b=b, r=result),
                          answer_t.format(a=a, b=b, r=wrong), "arithmetic"))
    return items


def _conversion_items(rng: random.Random, count: int) -> list[Item]:
    items, seen = [], set()
    while len(items) < count:
        template, factor, unit_from, unit_to = CONVERSIONS[len(items) % len(CONVERSIONS)]
        x = rng.randint(2, 15)
        if (template, x) in seen:
            continue
        seen.add((template, x))
        right, wrong = x * factor, x * factor // 10 or x + 1
        items.append(Item(template.format(x=x), f"{x} {unit_from} is {right} {unit_to}.",
                          f"{x} {unit_from} is {wrong} {unit_to}.", "conversions"))
    return items


def _definition_items() -> list[Item]:
    items = []
    for index, (term, right, wrong) in enumerate(DEFINITIONS):
        template = DEFINITION_TEMPLATES[index % len(DEFINITION_TEMPLATES)]
        cap = term[0].upper() + term[1:]
        items.append(Item(template.format(t=term), f"{cap} is {right}.", f"{cap} is {wrong}.", "definitions"))
    return items


def _instruction_items(rng: random.Random) -> list[Item]:
    items = []
    for word in WORDS:
        items.append(Item(f"Write the word '{word}' backwards.", f"'{word}' backwards is '{word[::-1]}'.",
                          f"'{word}' backwards is '{word[1:] + word[0]}'.", "instructions"))
        items.append(Item(f"How many letters are in the word '{word}'?",
                          f"The word '{word}' has {len(word)} letters.",
                          f"The word '{word}' has {len(word) + 2} letters.", "instructions"))
    for word, opposite in OPPOSITES:
        items.append(Item(f"What is the opposite of '{word}'?", f"The opposite of '{word}' is '{opposite}'.",
                          f"The opposite of '{word}' is '{word}ish'.", "instructions"))
    for _ in range(10):
        numbers = rng.sample(range(1, 50), 4)
        ordered = sorted(numbers)
        items.append(Item(f"Sort these numbers from smallest to largest: {', '.join(map(str, numbers))}.",
                          f"From smallest to largest: {', '.join(map(str, ordered))}.",
                          f"From smallest to largest: {', '.join(map(str, numbers[::-1]))}.", "instructions"))
    return items


def _fact_items() -> list[Item]:
    return [Item(prompt, right, wrong, "facts") for prompt, right, wrong in FACTS]


def _translation_items() -> list[Item]:
    return [
        Item(f"How do you say '{english}' in {language}?", f"In {language}, '{english}' is {right}.",
             f"In {language}, '{english}' is {wrong}.", "translations")
        for english, language, right, wrong in TRANSLATIONS
    ]


def _annotation(ratings: dict[str, str], quality: str) -> dict:
    """The raw annotation object: a string Rating per aspect, with rationales like the real data."""
    rationale = {
        "good": "The response answers the question directly and correctly.",
        "okay": "The response is correct but could be clearer.",
        "evasive": "The response avoids the question and gives no useful information.",
        "wrong": "The response is confident but factually incorrect.",
        "off_topic": "The response does not address the question at all.",
        "empty": "No response was given.",
    }[quality]
    annotations = {}
    for aspect in ASPECTS:
        entry = {"Rating": ratings[aspect], "Rationale": rationale}
        if aspect in ("helpfulness", "truthfulness"):
            entry["Rationale For Rating"] = rationale
            entry["Type"] = ["1", "2"] if quality in ("good", "okay") else ["0"]
        annotations[aspect] = entry
    return annotations


QUALITY_RATINGS = {
    # quality: (rating per aspect, overall_score)
    "good": ({"instruction_following": "5", "honesty": "5", "truthfulness": "5", "helpfulness": "5"}, 9.0),
    "okay": ({"instruction_following": "4", "honesty": "4", "truthfulness": "5", "helpfulness": "3"}, 7.0),
    "evasive": ({"instruction_following": "1", "honesty": "3", "truthfulness": "3", "helpfulness": "1"}, 3.0),
    "wrong": ({"instruction_following": "3", "honesty": "1", "truthfulness": "1", "helpfulness": "1"}, 2.5),
    "off_topic": ({"instruction_following": "1", "honesty": "2", "truthfulness": "2", "helpfulness": "1"}, 2.0),
    "empty": ({"instruction_following": "1", "honesty": "1", "truthfulness": "1", "helpfulness": "1"}, 1.0),
}


def _fine_grained(ratings: dict[str, str]) -> float:
    numbers = [float(value) for value in ratings.values() if value.replace(".", "", 1).isdigit()]
    return round(sum(numbers) / len(numbers), 2) if numbers else 0.0


def _completion(rng: random.Random, model: str, quality: str, item: Item) -> dict:
    response = {
        "good": item.correct,
        "okay": f"I believe the answer is this: {item.correct} I hope that helps.",
        "evasive": rng.choice(EVASIVE),
        "wrong": item.wrong,
        "off_topic": rng.choice(OFF_TOPIC),
        "empty": "",
    }[quality]
    ratings, overall = QUALITY_RATINGS[quality]
    ratings = dict(ratings)
    principle = rng.choice(list(PRINCIPLES))
    return {
        "annotations": _annotation(ratings, quality),
        "critique": "Clear and correct." if quality in ("good", "okay") else "This answer is not useful.",
        "custom_system_prompt": PRINCIPLES[principle],
        "fine-grained_score": _fine_grained(ratings),
        "model": model,
        "overall_score": overall,
        "principle": principle,
        "response": response,
    }


def _record(rng: random.Random, item: Item, qualities: list[str], source: str | None = None) -> dict:
    models = rng.sample(MODELS, len(qualities))
    order = list(range(len(qualities)))
    rng.shuffle(order)  # the best completion is not always first
    completions = [_completion(rng, models[i], qualities[i], item) for i in order]
    return {
        "source": source or rng.choice(SOURCES),
        "instruction": item.prompt,
        "models": [c["model"] for c in completions],
        "correct_answers": [],
        "incorrect_answers": [],
        "completions": completions,
    }


def _set_rating(completion: dict, aspect: str, value: str) -> None:
    completion["annotations"][aspect]["Rating"] = value
    ratings = {a: completion["annotations"][a]["Rating"] for a in ASPECTS}
    completion["fine-grained_score"] = _fine_grained(ratings)


def build_records(seed: int = DEFAULT_SEED, records: int = 300) -> list[dict]:
    """All sample records, in a fixed order for a given seed."""
    rng = random.Random(seed)
    items = (_capital_items(rng) + _definition_items() + _fact_items() + _translation_items()
             + _instruction_items(rng) + _conversion_items(rng, 40))
    extra_records = 3 + len(TRUTHFUL_QA)  # repeated prompts and truthful_qa come on top of the items
    items += _arithmetic_items(rng, max(0, records - len(items) - extra_records))
    rng.shuffle(items)
    # The first 18 items only appear in the special records below, so no prompt of the main set has a
    # near-copy ("Please answer: ...") that could land in the other split.
    special, main = items[:18], items[18:]
    out: list[dict] = []
    bad = ["evasive", "wrong", "off_topic"]
    for index, item in enumerate(main):
        qualities = ["good"] + [rng.choice(bad) for _ in range(3)]
        if index % 10 == 3:
            qualities[3] = "okay"  # a correct but weaker answer sometimes competes
        out.append(_record(rng, item, qualities))
    # Ties: every completion rated the same, so the argilla and max-min recipes find no pair.
    for item in special[:4]:
        tied = _record(rng, Item(item.prompt.rstrip("?.") + ", please?", item.correct, item.wrong, item.topic),
                       ["good", "good", "good", "good"])
        for n, completion in enumerate(tied["completions"]):
            completion["response"] = [item.correct, item.correct.upper(), f"Sure. {item.correct}",
                                       f"{item.correct} Glad to help."][n]
        out.append(tied)
    # "N/A" ratings: ignored by the mean, counted in the manifest.
    for item in special[4:12]:
        record = _record(rng, Item(f"Quick question: {item.prompt[0].lower()}{item.prompt[1:]}", item.correct,
                                   item.wrong, item.topic), ["good", "wrong", "evasive", "off_topic"])
        _set_rating(record["completions"][0], "honesty", "N/A")
        _set_rating(record["completions"][1], "truthfulness", "N/A")
        out.append(record)
    # Empty and whitespace-only responses: never chosen or rejected.
    for item, blank in zip(special[12:14], ["", "   \n"], strict=True):
        record = _record(rng, Item(f"Answer briefly: {item.prompt}", item.correct, item.wrong, item.topic),
                         ["good", "empty", "empty", "wrong"])
        for completion in record["completions"]:
            if completion["response"] == "":
                completion["response"] = blank
        out.append(record)
    # A single completion: too few to make a pair.
    item = special[14]
    out.append(_record(rng, Item(f"In a few words: {item.prompt}", item.correct, item.wrong, item.topic), ["good"]))
    # The 2023 overall_score bug: a bad completion whose critique rating 1 was read as 10.
    for item in special[15:18]:
        record = _record(rng, Item(f"Please answer: {item.prompt}", item.correct, item.wrong, item.topic),
                         ["good", "wrong", "evasive", "off_topic"])
        for completion in record["completions"]:
            if completion["response"] == item.wrong:
                completion["overall_score"] = 10.0
        out.append(record)
    # Repeated prompts: the same instruction again, with other completions (dedupe keeps the first).
    for item in main[:3]:
        out.append(_record(rng, item, ["good", "evasive", "off_topic", "wrong"]))
    # truthful_qa records: dropped by decontamination.
    for prompt, right, wrong in TRUTHFUL_QA:
        record = _record(rng, Item(prompt, right, wrong, "truthful_qa"), ["good", "wrong", "evasive", "okay"],
                         source="truthful_qa")
        record["correct_answers"] = [right]
        record["incorrect_answers"] = [wrong]
        out.append(record)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("ultrafeedback_sample.jsonl"))
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--records", type=int, default=300)
    args = parser.parse_args()
    records = build_records(args.seed, args.records)
    with args.out.open("w", encoding="utf-8", newline="\n") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"wrote {len(records)} records to {args.out}")


if __name__ == "__main__":
    main()
