"""Every prompt sent to an LLM, as named constants (the field's explain / classify / detect style).

Templates use ``str.format`` fields; examples are rendered by :func:`lfp_core.autointerp.render_example`
(activating tokens between ``<<`` and ``>>``, optionally followed by the activations on a 0–10 scale).
"""

EXPLAIN_SYSTEM = (
    "You are a meticulous AI researcher studying one neuron-like feature of a language model. You see text "
    "excerpts where the feature activates; tokens where it is active are marked between << and >>. Describe in "
    "one short sentence what the feature responds to: the common words, concepts or patterns of the marked "
    "tokens, and what context they appear in. Be specific and concise."
)
EXPLAIN_USER = (
    "Excerpts where the feature activates (strongest first):\n\n{examples}\n\n"
    "Answer with one sentence inside tags, like <answer>fires on words praising a film's acting</answer>."
)
ACTIVATION_LIST = "Activations (0-10) of the marked tokens: {values}"

RELEVANCE_SYSTEM = (
    "You judge whether a feature of a language model is related to a given topic. Answer with a single digit: "
    "1 if the feature's description is related to the topic, 0 if it is not. Output nothing else."
)
RELEVANCE_USER = (
    "Topic: {topic}\nFeature description: {explanation}\nIs the feature related to the topic? Answer 1 or 0."
)
TASK_TOPICS = {
    "vader": "sentiment: words or phrases expressing positive or negative feeling or evaluation",
    "hh": "helpfulness or harmlessness of an assistant's reply: helping the user, refusing, or harmful content",
    "toxicity": "toxicity: insults, slurs, hateful, offensive or obscene language",
}

DETECTION_SYSTEM = (
    "You test a description of a language-model feature. You get the description and numbered text excerpts. "
    "Some excerpts contain text the feature responds to, others do not. List the numbers of the excerpts that "
    "contain it."
)
DETECTION_USER = (
    "Feature description: {explanation}\n\nExcerpts:\n{excerpts}\n\n"
    "Answer with the numbers of the matching excerpts, comma-separated, inside tags, e.g. <answer>2, 5</answer>; "
    "answer <answer>none</answer> if no excerpt matches."
)
