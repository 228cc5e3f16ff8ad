"""Phrasings of the Yo'LLaVA training conversations (written for this project)."""

RECOGNITION_QUESTIONS = [
    "Is {c} in this photo?",
    "Is {c} in this image?",
    "Can you see {c} in this photo?",
    "Do you see {c} here?",
    "Is {c} anywhere in this picture?",
    "Does this photo show {c}?",
    "Does this picture contain {c}?",
    "Can you find {c} in this image?",
    "Is {c} present in this photo?",
    "Would you say {c} appears in this picture?",
    "Is this a photo of {c}?",
    "Could {c} be in this image?",
    "Look at this photo. Is {c} in it?",
    "Tell me whether {c} is in this photo.",
    "Is {c} visible in this picture?",
    "Have I got {c} in this shot?",
    "Is {c} in the picture?",
    "Does {c} show up in this image?",
    "Am I looking at {c} here?",
    "Can you spot {c} in this photo?",
    "Is {c} captured in this image?",
    "Do you recognize {c} in this photo?",
    "Is {c} one of the things in this picture?",
    "Check this photo: is {c} there?",
    "Would I find {c} in this image?",
    "Is {c} shown in this photo?",
    "Is there {c} in this picture?",
    "Does this image include {c}?",
    "Is {c} the one in this photo?",
    "Yes or no: is {c} in this image?",
]

YES_ANSWERS = [
    "Yes, {c} is in this photo.",
    "Yes, I can see {c} in this photo.",
    "Yes, {c} is in this image.",
    "Yes, this photo shows {c}.",
    "Yes, {c} appears in this picture.",
    "Yes, that is {c}.",
]

NO_ANSWERS = [
    "No, {c} is not in this photo.",
    "No, I cannot see {c} in this photo.",
    "No, {c} is not in this image.",
    "No, this photo does not show {c}.",
    "No, {c} does not appear in this picture.",
    "No, that is not {c}.",
]

# Asked of the base model about a training photo; the answers are then trained
# against the concept *without* the photo, so the tokens must carry the facts.
ATTRIBUTE_QUESTIONS = [
    ("What colour is the main subject of this photo?", "What colour is {c}?"),
    ("What shape is the main subject of this photo?", "What shape is {c}?"),
    ("Describe the texture or pattern of the main subject of this photo.", "Describe the texture or pattern of {c}."),
    ("Does the main subject of this photo have any distinctive markings? Describe them.",
     "Does {c} have any distinctive markings? Describe them."),
    ("How big is the main subject of this photo?", "How big is {c}?"),
    ("What kind of thing is the main subject of this photo?", "What kind of thing is {c}?"),
    ("Describe the main subject of this photo in detail.", "Describe {c} in detail."),
    ("What stands out most about the main subject of this photo?", "What stands out most about {c}?"),
    ("What material does the main subject of this photo look made of?", "What material does {c} look made of?"),
    ("Describe the main subject of this photo in one sentence.", "Describe {c} in one sentence."),
]

RECOGNITION_EVAL_QUESTION = "Is {c} in this photo? Answer with yes or no."

# Multiple-choice questions end with this line (the Yo'LLaVA evaluation's QA form).
QA_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
