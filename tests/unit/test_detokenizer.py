"""IncrementalDetokenizer on a real byte-level BPE tokenizer (DeepSeek's kind) trained on a tiny corpus."""

import functools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from common.engine.detokenizer import IncrementalDetokenizer

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b  # stop here\n",
    "Café, naïve, déjà vu, crème brûlée, Ærøskøbing, über, Straße, ¿qué tal?",
    "你好，世界！我们今天学习机器学习和深度学习。",
    "混合专家模型使用多头潜在注意力。",
    "日本語のテキストも少し。한국어도 조금.",
    "Emoji: 😀 😂 👍🏽 🚀 ❤️ 👨‍👩‍👧 🇫🇷",
    "Math: ∑ ∫ √ ≤ ≥ ∞ π ≈ 3.14159",
]
TEXTS = CORPUS + [
    "",
    " ",
    "a",
    "多头潜在注意力 (MLA) caches a latent: c_kv ∈ ℝ^512 😀",
    "👨‍👩‍👧‍👦👍🏿🇯🇵 rare emoji the corpus never saw",
    "\n\n\t  mixed   whitespace  \n",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 outside the BMP: 𝄞 𓂀",
    "Ελληνικά, русский, עברית, العربية",
]


@functools.cache
def tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    return tok


def encode(text: str) -> list[int]:
    return tokenizer().encode(text).ids


def stream(ids, prompt_ids=(), **kwargs) -> tuple[IncrementalDetokenizer, list[str]]:
    """Feed ids one at a time (stopping when a stop string matched, as the engine does); flush at the end."""
    detok = IncrementalDetokenizer(tokenizer(), prompt_ids, **kwargs)
    deltas = []
    for token_id in ids:
        deltas.append(detok.add(token_id))
        if detok.stopped:
            break
    deltas.append(detok.flush())
    return detok, deltas


def test_the_tokenizer_splits_characters_across_tokens():
    """Otherwise the tests below would not exercise the hold-back of incomplete UTF-8."""
    tok = tokenizer()
    assert any("\ufffd" in tok.decode([i]) for i in range(tok.get_vocab_size()))
    assert any("\ufffd" in tok.decode([i]) for i in encode("👨‍👩‍👧‍👦 𝄞"))


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_the_decoded_text(text):
    ids = encode(text)
    detok, deltas = stream(ids, prompt_ids=encode("Prompt: 你好"))
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == detok.text == tokenizer().decode(ids) == text
    assert detok.stopped is None


@pytest.mark.parametrize("text", TEXTS)
def test_a_deferred_detokenizer_gives_the_streamed_text_at_flush(text):
    ids, prompt = encode(text), encode("Prompt: 你好")
    streamed, _ = stream(ids, prompt_ids=prompt)
    detok = IncrementalDetokenizer(tokenizer(), prompt, deferred=True)
    assert [detok.add(i) for i in ids] == [""] * len(ids) and detok.text == ""
    assert detok.flush() == detok.text == streamed.text == text


def test_stop_strings_cannot_be_deferred():
    with pytest.raises(ValueError, match="deferred"):
        IncrementalDetokenizer(tokenizer(), [], stop=["x"], deferred=True)


def test_incomplete_characters_are_held_back():
    ids = encode("😀")
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tokenizer(), [])
    assert [detok.add(i) for i in ids] == [""] * (len(ids) - 1) + ["😀"]


def test_the_window_stays_short():
    """Per-token work is O(window): the detokenizer keeps only a few recent ids, however long the output."""
    long = encode(" ".join(TEXTS) * 20)
    detok = IncrementalDetokenizer(tokenizer(), long)
    for token_id in long:
        detok.add(token_id)
        assert len(detok._ids) <= 8


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_are_skipped_or_kept(skip):
    tok = tokenizer()
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    ids = [bos, *encode("Hi 你好"), eos, *encode(" 😀"), eos]
    detok, deltas = stream(ids, prompt_ids=[bos], skip_special_tokens=skip)
    assert "".join(deltas) == detok.text == tok.decode(ids, skip_special_tokens=skip)
    assert detok.text == (f"{BOS}Hi 你好{EOS} 😀{EOS}" if not skip else "Hi 你好 😀")


def test_a_prompt_ending_mid_character_does_not_leak_into_the_output():
    clef = encode("𝄞")
    prompt, ids = encode("ok") + clef[:-1], clef[-1:] + encode("hello")  # the output completes the clef
    assert tokenizer().decode(prompt).endswith("\ufffd")
    detok, deltas = stream(ids, prompt_ids=prompt)
    assert "".join(deltas) == detok.text == tokenizer().decode(ids) == "\ufffdhello"


# ---- stop strings ------------------------------------------------------------------------------------------


def test_single_token_stop_string():
    ids = encode("Hello world! The quick brown fox")
    stop = tokenizer().decode([ids[2]])
    assert stop and "Hello world! The quick brown fox".count(stop) == 1
    detok, deltas = stream(ids, stop=[stop])
    assert detok.stopped == stop
    full = tokenizer().decode(ids)
    assert "".join(deltas) == detok.text == full[: full.index(stop)]


def test_stop_string_spanning_tokens_is_never_streamed():
    text = "def add(a, b):\n    return a + b  # stop here\n"
    stop = "a + b  # st"
    ids = encode(text)
    assert len(encode(stop)) > 2
    expected = "def add(a, b):\n    return "
    detok = IncrementalDetokenizer(tokenizer(), [], stop=[stop])
    streamed = ""
    for n, token_id in enumerate(ids, 1):  # noqa: B007 (n is used after the loop)
        streamed += detok.add(token_id)
        assert expected.startswith(streamed), "streamed part of the stop string"
        if detok.stopped:
            break
    assert stop in tokenizer().decode(ids[:n]) and stop not in tokenizer().decode(ids[: n - 1])
    assert detok.stopped == stop and streamed + detok.flush() == detok.text == expected
    assert detok.add(ids[0]) == "" and detok.text == expected  # a stopped detokenizer ignores further ids


def test_stop_string_made_of_multibyte_characters():
    text = "你好，世界！我们今天学习机器学习和深度学习。"
    detok, deltas = stream(encode(text), stop=["机器学"])
    assert detok.stopped == "机器学"
    assert "".join(deltas) == detok.text == "你好，世界！我们今天学习"


def test_stop_string_at_the_very_start():
    detok, deltas = stream(encode("STOP and more text"), stop=["STOP"])
    assert detok.stopped == "STOP" and detok.text == "" and deltas == [""] * len(deltas)


def test_include_stop_str_in_output():
    detok, deltas = stream(encode("one two three four"), stop=["three"], include_stop_str_in_output=True)
    assert detok.stopped == "three"
    assert "".join(deltas) == detok.text == "one two three"


def test_absent_stop_string_releases_the_held_back_tail_on_flush():
    ids = encode("the answer is abc")
    detok = IncrementalDetokenizer(tokenizer(), [], stop=["abcd", "zz"])
    streamed = "".join(detok.add(i) for i in ids)
    assert streamed == "the answer is "  # "abc" could still become "abcd"
    assert detok.flush() == "abc" and detok.text == "the answer is abc" and detok.stopped is None


def test_only_a_possible_stop_prefix_is_held_back():
    detok = IncrementalDetokenizer(tokenizer(), [], stop=["\n\nUser:"])
    assert "".join(detok.add(i) for i in encode("Hello world")) == "Hello world"


def test_the_stop_string_that_completes_first_wins():
    detok, _ = stream(encode("abcdef"), stop=["cdef", "bcd", "xyz"])
    assert detok.stopped == "bcd" and detok.text == "a"


def test_empty_stop_strings_are_rejected():
    with pytest.raises(ValueError, match="stop"):
        IncrementalDetokenizer(tokenizer(), [], stop=[""])


# ---- properties --------------------------------------------------------------------------------------------

ALPHABET = [*"ab xyz.,!\n", *"éüßñ", *"你好世界学习", "😀", "👍🏽", "🇫🇷", "👨‍👩‍👧", "𝄞", "\ufffd"]
texts = st.lists(st.sampled_from(ALPHABET), max_size=40).map("".join)


@settings(max_examples=300, deadline=None)
@given(text=texts, prompt=texts, stop_at=st.none() | st.tuples(st.integers(0, 40), st.integers(1, 6)))
def test_streaming_random_text(text, prompt, stop_at):
    """Random mixed-script text: deltas rebuild decode(ids); a stop string cuts at its first occurrence."""
    tok = tokenizer()
    ids = encode(text)
    stop = [text[stop_at[0] : stop_at[0] + stop_at[1]]] if stop_at and text[stop_at[0] :] else []
    include = bool(stop_at and stop_at[1] % 2)
    detok = IncrementalDetokenizer(tok, encode(prompt), stop=stop, include_stop_str_in_output=include)
    deltas, fired_at = [], None
    for n, token_id in enumerate(ids, 1):
        deltas.append(detok.add(token_id))
        if detok.stopped:
            fired_at = n
            break
    deltas.append(detok.flush())
    assert "".join(deltas) == detok.text
    if "\ufffd" not in text:
        assert not any("\ufffd" in d for d in deltas)
    if not stop:
        assert detok.text == tok.decode(ids) == text and detok.stopped is None
        return
    s = stop[0]
    assert detok.stopped == s
    assert detok.text == text[: text.index(s) + (len(s) if include else 0)]
    # It fired at the first token after which the decodable text contains the stop string (or at flush,
    # if the text ends in a genuine U+FFFD, which is indistinguishable from an incomplete character).
    prefixes = (tok.decode(ids[:n]) for n in range(1, len(ids) + 1))
    first = (n for n, d in enumerate(prefixes, 1) if s in d and not d.endswith("\ufffd"))
    assert fired_at == next(first, None)


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(st.integers(0, 2**16), max_size=30), prompt=st.lists(st.integers(0, 2**16), max_size=8))
def test_streaming_arbitrary_token_ids(ids, prompt):
    """Even ids that make invalid UTF-8 (or special tokens) stream to exactly decode(ids), and a deferred
    detokenizer's one window at the end gives the same text."""
    tok = tokenizer()
    ids, prompt = [i % tok.get_vocab_size() for i in ids], [i % tok.get_vocab_size() for i in prompt]
    for skip in (True, False):
        detok, deltas = stream(ids, prompt_ids=prompt, skip_special_tokens=skip)
        assert "".join(deltas) == detok.text == tok.decode(ids, skip_special_tokens=skip)
        deferred, _ = stream(ids, prompt_ids=prompt, skip_special_tokens=skip, deferred=True)
        assert deferred.text == detok.text
