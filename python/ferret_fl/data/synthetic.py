"""An offline Natural-Instructions-style benchmark generated from a seed (ships with the package).

37 small tasks (string formatting, extraction, arithmetic, lookups in built-in tables), each with
an NI-style Definition and instances produced by a generator. The answer is short and a pure
function of the input, so Rouge-L against it measures real improvement. 25 tasks are training
tasks (one client each); the 12 held-out tasks are unseen "siblings" of training skills
(lower-case vs upper-case, min vs max, country of a capital vs capital of a country, ...), the
analogue of NI's test tasks. Held-out instances of the training tasks are returned as well,
with inputs disjoint from every client's.

A 135M instruct model typically answers these zero-shot with the right content wrapped in
chatty text, or with the wrong format; a few federated rounds teach the terse format (seen and
unseen tasks alike) and, more slowly, the skills.

Every instance stream is seeded from (seed, task name) alone, so the data is identical across
calls, processes and machines, and does not depend on which other tasks are selected.
"""

from __future__ import annotations

import calendar
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .types import ClientData, Example, FederatedDataset

# fmt: off
_PLURALS = {
    "apple": "apples", "baby": "babies", "book": "books", "box": "boxes", "bus": "buses",
    "car": "cars", "cat": "cats", "chair": "chairs", "child": "children", "church": "churches",
    "city": "cities", "dish": "dishes", "dog": "dogs", "flower": "flowers", "foot": "feet",
    "fox": "foxes", "glass": "glasses", "goose": "geese", "hero": "heroes", "house": "houses",
    "key": "keys", "knife": "knives", "lady": "ladies", "leaf": "leaves", "life": "lives",
    "man": "men", "mountain": "mountains", "mouse": "mice", "party": "parties", "pen": "pens",
    "person": "people", "photo": "photos", "piano": "pianos", "potato": "potatoes",
    "river": "rivers", "shelf": "shelves", "story": "stories", "table": "tables",
    "tomato": "tomatoes", "tooth": "teeth", "toy": "toys", "tree": "trees", "wife": "wives",
    "window": "windows", "wolf": "wolves", "woman": "women", "bird": "birds", "garden": "gardens",
    "lamp": "lamps", "horse": "horses", "bridge": "bridges", "boat": "boats", "candle": "candles",
    "wish": "wishes", "brush": "brushes", "cherry": "cherries", "day": "days", "ox": "oxen",
}
_NOUNS = tuple(sorted(_PLURALS))
# Countable, buyable things, so that prices and counts read naturally.
_THINGS = (
    "apple", "book", "box", "candle", "chair", "cherry", "dish", "glass", "key", "knife", "lamp",
    "pen", "photo", "piano", "potato", "shelf", "table", "tomato", "toy", "brush", "boat", "car",
)
_ADJECTIVES = (
    "small", "large", "quiet", "bright", "old", "young", "happy", "tired", "green", "yellow",
    "wooden", "little", "clever", "lazy", "brave", "gentle", "noisy", "shiny", "ancient", "friendly",
)
_VERBS = ("slept", "waited", "arrived", "stood", "rested", "jumped", "appeared", "stayed", "sat", "moved")
_PREPOSITIONS = ("near", "under", "behind", "beside", "inside", "above")
_ADVERBS = ("quietly", "yesterday", "again", "slowly", "today", "outside")
_FIRST_NAMES = (
    "Alice", "Bruno", "Chen", "Diana", "Emil", "Fatima", "George", "Hana", "Ivan", "Julia",
    "Kofi", "Laura", "Mateo", "Nadia", "Oscar", "Priya", "Quentin", "Rosa", "Samir", "Tara",
    "Umar", "Vera", "Wen", "Yusuf", "Zoe",
)
_LAST_NAMES = (
    "Adams", "Brown", "Costa", "Dubois", "Evans", "Fischer", "Garcia", "Hughes", "Ito", "Jensen",
    "Khan", "Lopez", "Moreau", "Novak", "Okafor", "Patel", "Rossi", "Silva", "Tanaka", "Weber",
)
_EMAIL_DOMAINS = ("example.com", "mail.org", "company.net", "school.edu", "post.io")
_CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Portugal": "Lisbon", "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi",
    "Russia": "Moscow", "Canada": "Ottawa", "Australia": "Canberra", "Brazil": "Brasilia",
    "Argentina": "Buenos Aires", "Mexico": "Mexico City", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Nigeria": "Abuja", "Greece": "Athens", "Turkey": "Ankara", "Poland": "Warsaw",
    "Sweden": "Stockholm", "Norway": "Oslo", "Finland": "Helsinki", "Denmark": "Copenhagen",
    "Netherlands": "Amsterdam", "Belgium": "Brussels", "Austria": "Vienna", "Switzerland": "Bern",
    "Ireland": "Dublin", "United Kingdom": "London", "Peru": "Lima", "Chile": "Santiago",
    "Colombia": "Bogota", "Venezuela": "Caracas", "Cuba": "Havana", "Thailand": "Bangkok",
    "Vietnam": "Hanoi", "Indonesia": "Jakarta", "Philippines": "Manila", "South Korea": "Seoul",
    "Iran": "Tehran", "Iraq": "Baghdad", "Saudi Arabia": "Riyadh", "Pakistan": "Islamabad",
    "Bangladesh": "Dhaka", "Nepal": "Kathmandu", "Hungary": "Budapest", "Czech Republic": "Prague",
    "Romania": "Bucharest", "Ukraine": "Kyiv", "Morocco": "Rabat", "Ethiopia": "Addis Ababa",
    "New Zealand": "Wellington", "Iceland": "Reykjavik", "Malaysia": "Kuala Lumpur",
    "Ghana": "Accra", "Senegal": "Dakar", "Bulgaria": "Sofia", "Croatia": "Zagreb",
    "Serbia": "Belgrade", "Jamaica": "Kingston",
}
_ANTONYM_PAIRS = (
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
    ("early", "late"), ("open", "closed"), ("strong", "weak"), ("rich", "poor"), ("young", "old"),
    ("tall", "short"), ("hard", "soft"), ("wet", "dry"), ("full", "empty"), ("clean", "dirty"),
    ("loud", "quiet"), ("cheap", "expensive"), ("thick", "thin"), ("above", "below"),
    ("push", "pull"), ("win", "lose"), ("buy", "sell"), ("give", "take"), ("up", "down"),
    ("inside", "outside"), ("first", "last"), ("true", "false"), ("begin", "end"), ("love", "hate"),
    ("accept", "reject"), ("increase", "decrease"), ("arrive", "depart"), ("remember", "forget"),
    ("friend", "enemy"), ("day", "night"), ("north", "south"), ("east", "west"), ("left", "right"),
    ("question", "answer"), ("maximum", "minimum"), ("ancient", "modern"), ("polite", "rude"),
    ("safe", "dangerous"), ("smooth", "rough"), ("sweet", "sour"), ("wide", "narrow"),
    ("deep", "shallow"), ("awake", "asleep"), ("absent", "present"), ("victory", "defeat"),
)
_ANTONYMS = {**dict(_ANTONYM_PAIRS), **{b: a for a, b in _ANTONYM_PAIRS}}
_KEY_VALUES = {
    "name": _FIRST_NAMES,
    "city": tuple(_CAPITALS.values()),
    "color": ("red", "blue", "green", "black", "white", "orange", "purple", "gray"),
    "animal": ("cat", "dog", "horse", "owl", "tiger", "rabbit", "whale", "fox"),
    "fruit": ("apple", "banana", "cherry", "mango", "pear", "plum", "lemon", "grape"),
    "language": ("English", "French", "Spanish", "Hindi", "Swahili", "Korean", "Polish", "Arabic"),
    "sport": ("tennis", "football", "chess", "rowing", "golf", "cricket", "hockey", "judo"),
}
_POSITIVE = ("wonderful", "excellent", "delightful", "fantastic", "great", "lovely")
_NEGATIVE = ("terrible", "awful", "disappointing", "horrible", "boring", "dreadful")
_ONES = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
)
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_WORDS = _NOUNS + _ADJECTIVES
# fmt: on


def number_to_words(n: int) -> str:
    """English words for 0 <= n <= 99 ("forty-two")."""
    if not 0 <= n <= 99:
        raise ValueError(f"n must be in 0..99; got {n}")
    if n < 20:
        return _ONES[n]
    tens, ones = divmod(n, 10)
    return _TENS[tens] if ones == 0 else f"{_TENS[tens]}-{_ONES[ones]}"


InstanceGenerator = Callable[[random.Random], tuple[str, str]]


def _sentence_words(rng: random.Random) -> list[str]:
    if rng.random() < 0.3:
        words = [rng.choice(_FIRST_NAMES)]
    else:
        words = [rng.choice(("The", "A", "My", "Our", "That", "Every"))]
        if rng.random() < 0.6:
            words.append(rng.choice(_ADJECTIVES))
        words.append(rng.choice(_NOUNS))
    words.append(rng.choice(_VERBS))
    if rng.random() < 0.7:
        words += [rng.choice(_PREPOSITIONS), "the", rng.choice(_NOUNS)]
    if rng.random() < 0.5:
        words.append(rng.choice(_ADVERBS))
    return words


def _distinct_numbers(rng: random.Random, low: int = 1, high: int = 99) -> list[int]:
    return rng.sample(range(low, high + 1), rng.randint(4, 6))


def _distinct_words(rng: random.Random, pool: Sequence[str] = _NOUNS) -> list[str]:
    return rng.sample(list(pool), rng.randint(3, 5))


def _iso_date(rng: random.Random) -> tuple[int, int, int]:
    year, month = rng.randint(1950, 2030), rng.randint(1, 12)
    return year, month, rng.randint(1, calendar.monthrange(year, month)[1])


def _full_name(rng: random.Random) -> tuple[str, str]:
    return rng.choice(_FIRST_NAMES), rng.choice(_LAST_NAMES)


def _upper(rng):
    word = rng.choice(_WORDS)
    return word, word.upper()


def _lower(rng):
    word = rng.choice(_WORDS).upper()
    return word, word.lower()


def _reverse_list(rng):
    words = _distinct_words(rng, _THINGS)
    return ", ".join(words), ", ".join(reversed(words))


def _sort_numbers(rng):
    numbers = _distinct_numbers(rng)
    return ", ".join(map(str, numbers)), ", ".join(map(str, sorted(numbers)))


def _sort_words(rng):
    words = _distinct_words(rng, _WORDS)
    return ", ".join(words), ", ".join(sorted(words))


def _max_of_list(rng):
    numbers = _distinct_numbers(rng)
    return ", ".join(map(str, numbers)), str(max(numbers))


def _min_of_list(rng):
    numbers = _distinct_numbers(rng)
    return ", ".join(map(str, numbers)), str(min(numbers))


def _extract_year(rng):
    year = rng.randint(1800, 2023)
    first, last = _full_name(rng)
    template = rng.choice(
        (
            "The {noun} museum was built in {year} after years of planning.",
            "In {year}, {first} {last} moved to {city}.",
            "{first} {last} was born in {year} in a small town near {city}.",
            "The company was founded in {year} by {first} {last}.",
            "Our {noun} club celebrated its first meeting in {year}.",
        )
    )
    text = template.format(
        noun=rng.choice(_NOUNS), year=year, first=first, last=last, city=rng.choice(tuple(_CAPITALS.values()))
    )
    return text, str(year)


def _email_address(rng: random.Random, first: str, last: str) -> str:
    local = rng.choice((f"{first}.{last}", f"{first[0]}{last}", f"{first}{rng.randint(1, 99)}"))
    return f"{local.lower()}@{rng.choice(_EMAIL_DOMAINS)}"


def _extract_email(rng):
    first, last = _full_name(rng)
    email = _email_address(rng, first, last)
    template = rng.choice(
        (
            "You can reach {first} at {email} before Friday.",
            "Please send the {noun} report to {email} by noon.",
            "For questions about the {noun}, write to {email}.",
            "{first} {last} ({email}) will lead the meeting.",
        )
    )
    return template.format(first=first, last=last, email=email, noun=rng.choice(_NOUNS)), email


def _extract_item_count(rng):
    count, noun = rng.randint(2, 60), rng.choice(_THINGS)
    first = rng.choice(_FIRST_NAMES)
    template = rng.choice(
        (
            "{first} bought {count} {plural} at the market.",
            "There were {count} {plural} in the old garden.",
            "Yesterday {first} counted {count} {plural} on the way home.",
        )
    )
    return template.format(first=first, count=count, plural=_PLURALS[noun]), str(count)


def _extract_price(rng):
    price, noun = rng.randint(2, 500), rng.choice(_THINGS)
    template = rng.choice(
        (
            "The {noun} costs ${price} at the corner shop.",
            "{first} paid ${price} for a new {noun}.",
            "A second-hand {noun} sells for ${price} online.",
        )
    )
    return template.format(noun=noun, price=price, first=rng.choice(_FIRST_NAMES)), f"${price}"


def _add(rng):
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"{a} + {b}", str(a + b)


def _subtract(rng):
    a, b = sorted((rng.randint(0, 99), rng.randint(0, 99)), reverse=True)
    return f"{a} - {b}", str(a - b)


def _multiply(rng):
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return f"{a} * {b}", str(a * b)


def _count_words(rng):
    words = _sentence_words(rng)
    return " ".join(words) + ".", str(len(words))


def _count_list_items(rng):
    words = _distinct_words(rng, _WORDS) + ([rng.choice(_ADJECTIVES)] if rng.random() < 0.5 else [])
    words = list(dict.fromkeys(words))
    return ", ".join(words), str(len(words))


def _number_words(rng):
    n = rng.randint(0, 99)
    return str(n), number_to_words(n)


def _pluralize(rng):
    noun = rng.choice(_NOUNS)
    return noun, _PLURALS[noun]


def _singularize(rng):
    noun = rng.choice(_NOUNS)
    return _PLURALS[noun], noun


def _first_word(rng):
    words = _sentence_words(rng)
    return " ".join(words) + ".", words[0]


def _last_word(rng):
    words = _sentence_words(rng)
    return " ".join(words) + ".", words[-1]


def _date_us(rng):
    year, month, day = _iso_date(rng)
    return f"{year:04d}-{month:02d}-{day:02d}", f"{month:02d}/{day:02d}/{year:04d}"


def _date_long(rng):
    year, month, day = _iso_date(rng)
    return f"{year:04d}-{month:02d}-{day:02d}", f"{calendar.month_name[month]} {day}, {year}"


def _month_name(rng):
    year, month, day = _iso_date(rng)
    return f"{year:04d}-{month:02d}-{day:02d}", calendar.month_name[month]


def _antonym(rng):
    word = rng.choice(sorted(_ANTONYMS))
    return word, _ANTONYMS[word]


def _capital_of(rng):
    country = rng.choice(sorted(_CAPITALS))
    return country, _CAPITALS[country]


def _country_of(rng):
    country = rng.choice(sorted(_CAPITALS))
    return _CAPITALS[country], country


def _key_value_json(rng):
    key = rng.choice(sorted(_KEY_VALUES))
    value = rng.choice(_KEY_VALUES[key])
    return f"{key}: {value}", json.dumps({key: value})


def _two_key_values_json(rng):
    first_key, second_key = rng.sample(sorted(_KEY_VALUES), 2)
    pairs = {first_key: rng.choice(_KEY_VALUES[first_key]), second_key: rng.choice(_KEY_VALUES[second_key])}
    return "; ".join(f"{k}: {v}" for k, v in pairs.items()), json.dumps(pairs)


def _word_length(rng):
    word = rng.choice(_WORDS)
    return word, str(len(word))


def _repeat_three(rng):
    word = rng.choice(_WORDS)
    return word, " ".join([word] * 3)


def _initials(rng):
    first, last = _full_name(rng)
    if rng.random() < 0.4:
        middle = rng.choice(_FIRST_NAMES)
        return f"{first} {middle} {last}", f"{first[0]}.{middle[0]}.{last[0]}."
    return f"{first} {last}", f"{first[0]}.{last[0]}."


def _title_case(rng):
    words = [w.lower() for w in _sentence_words(rng)]
    return " ".join(words), " ".join(w.capitalize() for w in words)


def _sentiment(rng):
    noun = rng.choice(_THINGS)
    if rng.random() < 0.5:
        verb, adjective, label = rng.choice(("loved", "enjoyed", "adored")), rng.choice(_POSITIVE), "positive"
    else:
        verb, adjective, label = rng.choice(("hated", "disliked", "regretted")), rng.choice(_NEGATIVE), "negative"
    template = rng.choice(
        (
            "I {verb} this {noun}; it was {adjective}.",
            "We {verb} the {noun} we got last week. Truly {adjective}.",
            "My family {verb} the {noun}, honestly {adjective}.",
        )
    )
    return template.format(verb=verb, noun=noun, adjective=adjective), label


def _odd_even(rng):
    n = rng.randint(0, 999)
    return str(n), "even" if n % 2 == 0 else "odd"


def _hyphenate(rng):
    words = [w.lower() for w in _sentence_words(rng)][: rng.randint(2, 4)]
    return " ".join(words), "-".join(words)


def _snake_case(rng):
    words = [w.lower() for w in _sentence_words(rng)][: rng.randint(2, 4)]
    return " ".join(words), "_".join(words)


@dataclass(frozen=True)
class SyntheticTask:
    """One generated task: NI-style name and Definition, and a generator of (input, output)."""

    name: str
    definition: str
    generate: InstanceGenerator


def _task(number: int, slug: str, generate: InstanceGenerator, definition: str) -> SyntheticTask:
    return SyntheticTask(f"synth{number:03d}_{slug}", definition, generate)


# fmt: off
TASKS: tuple[SyntheticTask, ...] = (
    _task(1, "uppercase_word", _upper,
          "In this task, you are given a word. Convert every letter of the word to upper case."),
    _task(2, "reverse_word_list", _reverse_list,
          "You are given a comma-separated list of words. Write the same words in reverse order, separated by commas."),
    _task(3, "sort_numbers", _sort_numbers,
          "Given a comma-separated list of numbers, sort them in ascending order. Separate the numbers with commas."),
    _task(4, "extract_year", _extract_year,
          "In this task, you are given a sentence that mentions a year. Extract the year."),
    _task(5, "extract_email", _extract_email,
          "You are given a short text containing an email address. Your task is to extract the email address."),
    _task(6, "add_numbers", _add,
          "In this task, you are given an addition of two integers. Compute the sum."),
    _task(7, "subtract_numbers", _subtract,
          "In this task, you are given a subtraction of two integers. Compute the result."),
    _task(8, "count_words", _count_words,
          "Given a sentence, count how many words it contains. Answer with a number."),
    _task(9, "number_to_words", _number_words,
          "You are given an integer between 0 and 99. Write the number in English words."),
    _task(10, "pluralize_noun", _pluralize,
          "In this task, you are given a singular English noun. Write its plural form."),
    _task(11, "first_word", _first_word,
          "Given a sentence, return the first word of the sentence."),
    _task(12, "date_iso_to_us", _date_us,
          "You are given a date in the format YYYY-MM-DD. Rewrite it in the format MM/DD/YYYY."),
    _task(13, "antonym", _antonym,
          "In this task, you are given an English word. Write a word with the opposite meaning."),
    _task(14, "capital_of_country", _capital_of,
          "You are given the name of a country. Answer with the name of its capital city."),
    _task(15, "key_value_to_json", _key_value_json,
          'You are given a key and a value written as "key: value". Write them as a JSON object.'),
    _task(16, "max_of_list", _max_of_list,
          "Given a comma-separated list of numbers, find the largest number."),
    _task(17, "word_length", _word_length,
          "In this task, you are given a word. Count the number of letters in the word."),
    _task(18, "repeat_word", _repeat_three,
          "You are given a word. Write the word three times, separated by single spaces."),
    _task(19, "name_initials", _initials,
          "Given a person's full name, write the initials, each followed by a period and with no spaces."),
    _task(20, "title_case", _title_case,
          "In this task, you are given a lower-case phrase. Capitalize the first letter of every word."),
    _task(21, "review_sentiment", _sentiment,
          'You are given a short product review. Classify its sentiment as "positive" or "negative".'),
    _task(22, "odd_or_even", _odd_even,
          'Given an integer, say whether it is "odd" or "even".'),
    _task(23, "join_with_hyphens", _hyphenate,
          "You are given a few lower-case words separated by spaces. Join them into one string with hyphens."),
    _task(24, "month_from_date", _month_name,
          "You are given a date in the format YYYY-MM-DD. Write the English name of its month."),
    _task(25, "extract_item_count", _extract_item_count,
          "In this task, you are given a sentence about some objects. Extract how many there are, as a number."),
    _task(26, "lowercase_word", _lower,
          "In this task, you are given a word in capital letters. Convert every letter of the word to lower case."),
    _task(27, "min_of_list", _min_of_list,
          "Given a comma-separated list of numbers, find the smallest number."),
    _task(28, "country_of_capital", _country_of,
          "You are given the name of a capital city. Answer with the name of the country it is the capital of."),
    _task(29, "singularize_noun", _singularize,
          "In this task, you are given a plural English noun. Write its singular form."),
    _task(30, "last_word", _last_word,
          "Given a sentence, return the last word of the sentence without punctuation."),
    _task(31, "multiply_numbers", _multiply,
          "In this task, you are given a multiplication of two integers. Compute the product."),
    _task(32, "sort_words", _sort_words,
          "Given a comma-separated list of words, sort them in alphabetical order. Separate the words with commas."),
    _task(33, "date_iso_to_long", _date_long,
          'You are given a date in the format YYYY-MM-DD. Rewrite it as "Month D, YYYY", for example "July 4, 1999".'),
    _task(34, "two_key_values_to_json", _two_key_values_json,
          'You are given two "key: value" pairs separated by a semicolon. Write them as one JSON object.'),
    _task(35, "join_with_underscores", _snake_case,
          "You are given a few lower-case words separated by spaces. Join them into one string with underscores."),
    _task(36, "count_list_items", _count_list_items,
          "Given a comma-separated list of words, count how many items the list contains. Answer with a number."),
    _task(37, "extract_price", _extract_price,
          "In this task, you are given a sentence that mentions a price. Extract the price with its dollar sign."),
)
# fmt: on
TASKS_BY_NAME = {task.name: task for task in TASKS}
# Tasks 26-37, each a sibling of a training skill.
DEFAULT_HELDOUT_TASKS: tuple[str, ...] = tuple(task.name for task in TASKS if int(task.name[5:8]) >= 26)


def generate_instances(
    task: SyntheticTask | str, count: int, seed: int = 0, exclude_inputs=(), stream: str = "train"
) -> list[Example]:
    """Up to ``count`` examples of ``task`` with pairwise distinct inputs, none in ``exclude_inputs``.

    Deterministic in (task name, seed, stream, count, exclude_inputs); ``stream`` names an
    independent sequence ("train", "eval"). Tasks over small tables (capitals, antonyms, plurals)
    can run out of distinct inputs and then return fewer than ``count``.
    """
    if isinstance(task, str):
        task = TASKS_BY_NAME[task]
    # random.Random seeds a str through SHA-512: stable across processes, unlike hash().
    rng = random.Random(f"{seed}/{stream}/{task.name}")
    seen = set(exclude_inputs)
    examples = []
    for _ in range(50 * count + 100):
        if len(examples) == count:
            break
        text, answer = task.generate(rng)
        if text not in seen:
            seen.add(text)
            examples.append(Example(instruction=task.definition, input=text, output=answer, task=task.name))
    return examples


def load_synthetic(
    *,
    train_instances_per_task: int = 64,
    eval_instances_per_task: int = 8,
    heldout_tasks: Sequence[str] = DEFAULT_HELDOUT_TASKS,
    seed: int = 0,
) -> FederatedDataset:
    """The synthetic benchmark as a federation: one client per training task.

    train_instances_per_task: client size (fewer for tasks whose input space runs out).
    eval_instances_per_task: per held-out task (``eval_examples``) and per training task
        (``seen_task_eval_examples``, inputs disjoint from that client's).
    heldout_tasks: task names kept out of training; every other task of ``TASKS`` is a client.

    Returns clients named after their tasks, in ``TASKS`` order.
    """
    unknown = sorted(set(heldout_tasks) - set(TASKS_BY_NAME))
    if unknown:
        raise ValueError(f"unknown synthetic task(s) {unknown}")
    heldout = set(heldout_tasks)
    clients, seen_eval = [], []
    for task in TASKS:
        if task.name in heldout:
            continue
        # Evaluation instances are drawn first so that training never sees their inputs.
        evaluation = generate_instances(task, eval_instances_per_task, seed, stream="eval")
        training = generate_instances(task, train_instances_per_task, seed, {ex.input for ex in evaluation})
        clients.append(ClientData(task.name, tuple(training)))
        seen_eval.extend(evaluation)
    eval_tasks = tuple(task.name for task in TASKS if task.name in heldout)
    eval_examples = [
        ex for name in eval_tasks for ex in generate_instances(name, eval_instances_per_task, seed, stream="eval")
    ]
    return FederatedDataset(
        name="synthetic",
        clients=tuple(clients),
        eval_examples=tuple(eval_examples),
        eval_tasks=eval_tasks,
        seen_task_eval_examples=tuple(seen_eval),
    )
