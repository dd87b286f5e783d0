"""What counts as naming a person, a dog or another detector class in a caption.

One reading serves both sides: the detector gates these words while decoding
(:mod:`captioner.grounding.detection`) and the hallucination measures count them
(:mod:`captioner.evaluation.hallucination`), so "invented a person" means the same to both.
"""

from __future__ import annotations

# How the word lists were chosen: every word seen >= 5 times in Flickr8k's captions.txt (2,977
# words) was read through and the nouns that name a person (people in general, ages and family
# roles, and the activity or job nouns Flickr8k uses for the person doing it: "surfer", "rider")
# were kept. Left out on purpose: pronouns ("he", "her", "his": Flickr8k uses them for dogs too,
# "a dog carries his toy"), "male"/"female" ("a male weimaraner"), "boxer" (a fighter or a dog
# breed), "jumper" (a person or a sweater), and group nouns that are as often dogs ("couple",
# "group", "team", "family"). A few inflections absent from that vocabulary are added (marked).
PERSON_WORDS: frozenset[str] = frozenset(
    """
    man men woman women person people persons guy guys lady ladies gentleman human humans
    individual individuals someone somebody adult adults mans crowd crowds audience spectators
    onlookers pedestrian pedestrians tourists passengers fans
    boy boys girl girls child children kid kids baby babies toddler toddlers infant teenager
    teenagers teen teens youth
    mother father mom dad daughter son brother sister parent parents bride groom bridesmaids
    groomsmen friend friends teammate peers member members owner owners
    player players skateboarder skateboarders snowboarder snowboarders surfer surfers rider riders
    biker bikers skier skiers skiiers climber climbers hiker hikers cyclist cyclists bicyclist
    bicyclists bicycler motorcyclist motorcyclists racer racers runner runners goalie wrestler
    wrestlers referee skater skaters driver photographer photographers policeman policemen officer
    officers cop kayaker kayakers swimmer swimmers cheerleader cheerleaders catcher pitcher batter
    batsman bowler rollerblader worker workers musician musicians artist artists singer guitarist
    drummer dancer dancers performer performers diver jockey jockeys waterskier fisherman vendor
    trainer wakeboarder footballer footballers backpacker jogger windsurfer firefighter fireman
    soldier sailor cowboy cowboys cowgirl clown clowns instructor teacher waiter priest athlete
    athletes gymnast quarterback baseman mountaineer surfboarder boarder cameraman fencers defenders
    opponent viewer student students santa pirate pirates ninja dj rival
    """.split()
)  # "persons", "humans" are the added inflections

# The same reading for dogs: "dog(s)", "puppy/puppies" and the breed names Flickr8k uses as nouns
# ("a black lab", "a german shepherd"). "boxer" is left out (see above).
DOG_WORDS: frozenset[str] = frozenset(
    """
    dog dogs puppy puppies pup pups doggy canine retriever terrier terriers collie greyhound
    greyhounds shepherd shephard poodle poodles husky labrador lab dalmatian dalmation doberman
    rottweiler pitbull beagle dachshund bulldog pug pugs corgi sheltie hound
    """.split()
)  # "pup", "pups", "doggy", "canine" are the added words

# Nouns that name a group of people or animals ("a group of people", "a couple of dogs"): they
# commit the caption to a person or an animal before the word that names one, so the gate holds
# them to the best-supported of its classes (a group needs a person, a dog or a cat).
GROUP_WORDS: frozenset[str] = frozenset(
    "group groups crowd crowds team teams couple couples family families pair pack bunch".split()
)

# Cats the way Flickr8k and everyday captions name them ("kitten" and "tabby" are added words).
CAT_WORDS: frozenset[str] = frozenset("cat cats kitten kittens kitty tabby".split())

# The detector's Open Images labels (detector.json) -> the caption words that name each one.
# Person, Dog and Cat use the lists above; the rest are the label's own noun, its plural and the
# everyday synonym Flickr8k uses ("bike"), nothing broader ("animal" is never gated).
LABEL_WORDS: dict[str, frozenset[str]] = {
    "Person": PERSON_WORDS,
    "Dog": DOG_WORDS,
    "Cat": CAT_WORDS,
    "Cattle": frozenset("cow cows cattle bull bulls calf calves ox oxen".split()),
    "Bicycle": frozenset("bicycle bicycles bike bikes".split()),
    "Stationary bicycle": frozenset(),
    "Car": frozenset("car cars".split()),
    "Vehicle": frozenset("vehicle vehicles truck trucks van vans bus buses jeep suv".split()),
    "Chair": frozenset("chair chairs".split()),
    "Table": frozenset("table tables".split()),
    "Desk": frozenset("desk desks".split()),
    "Laptop": frozenset("laptop laptops".split()),
    "Computer monitor": frozenset("monitor monitors".split()),
    "Computer mouse": frozenset(),  # "mouse" is an animal as often
    "Book": frozenset("book books".split()),
    "Camera": frozenset("camera cameras".split()),
    "Mug": frozenset("mug mugs".split()),
    "Coffee cup": frozenset("cup cups coffee".split()),
    "Bottle": frozenset("bottle bottles".split()),
    "Box": frozenset("box boxes".split()),
    "Footwear": frozenset("shoe shoes sneakers".split()),
    "Boot": frozenset("boot boots".split()),
    "High heels": frozenset("heels".split()),
}

# What the detector's label is called among an image's concepts ("person 0.74").
DISPLAY_NAMES: dict[str, str] = {
    "Person": "person",
    "Cattle": "cow",
    "Coffee cup": "cup",
    "Footwear": "shoe",  # a count noun, so "a shoe" can be said
    "High heels": "shoe",
}


def display_name(label: str) -> str:
    return DISPLAY_NAMES.get(label, label.lower())
