"""Labels as Whisper expects them: a leading space, and a share of timestamped training draws."""

from __future__ import annotations

import math

import pytest

from conftest import CV_EN
from whisper_ft.data import Bad, Prepare, TrainBatches, clean_text
from whisper_ft.sources import load_records


@pytest.fixture(scope="module")
def processor(tiny_model):
    from transformers import WhisperProcessor

    processor = WhisperProcessor.from_pretrained(tiny_model)
    processor.tokenizer.set_prefix_tokens(language="en", task="transcribe")
    return processor


def make(processor, p=0.0, seed=42):
    return Prepare(processor.feature_extractor, processor.tokenizer, timestamp_probability=p, seed=seed)


def token(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return ids[0]


def test_tiny_tokenizer_tells_a_word_after_a_space_from_one_without(processor):
    tok = processor.tokenizer
    assert token(tok, " the") != token(tok, "the")  # like byte-level BPE in every Whisper: "Ġthe" vs "the"
    assert tok.convert_tokens_to_ids("<|0.00|>") == tok.convert_tokens_to_ids("<|notimestamps|>") + 1


def test_labels_start_with_the_space_prefixed_first_word(processor):
    tok = processor.tokenizer
    prepare = make(processor)
    record = load_records(str(CV_EN), "train")[0]  # "the cat sat down"
    labels = prepare(record)["labels"]
    prefix = tok.prefix_tokens  # sot, <|en|>, <|transcribe|>, <|notimestamps|>
    assert labels[: len(prefix)] == prefix
    assert labels[len(prefix)] == token(tok, " the") != token(tok, "the")
    assert labels[len(prefix):] == tok(" the cat sat down", add_special_tokens=False).input_ids + [tok.eos_token_id]
    # Stray whitespace is normalised before tokenizing, so it never changes the labels.
    assert prepare.labels("  the cat\tsat  down \n") == prepare.labels("the cat sat down")
    assert clean_text(' say "hello"  to me ') == 'say "hello" to me'
    # The evaluator's reference (labels decoded, stripped) is the transcript itself: WER is unchanged.
    assert tok.decode(labels, skip_special_tokens=True).strip() == "the cat sat down"


def test_timestamp_targets_are_well_formed(processor):
    tok = processor.tokenizer
    prepare = make(processor, p=1.0)
    records = load_records(str(CV_EN), "train")[:4]
    plain = make(processor)
    no_ts, t0 = tok.convert_tokens_to_ids("<|notimestamps|>"), tok.convert_tokens_to_ids("<|0.00|>")
    for draw, record in enumerate(records):
        sample = prepare(record, draw=draw)
        labels, text = sample["labels"], plain(record)["labels"][4:-1]
        assert no_ts not in labels
        assert labels[:3] == tok.prefix_tokens[:3] and labels[3] == t0  # sot, en, transcribe, <|0.00|>
        assert labels[4:-2] == text and labels[-1] == tok.eos_token_id
        end = tok.convert_ids_to_tokens(labels[-2])
        seconds = float(end[2:-2])
        assert end == f"<|{seconds:.2f}|>" and seconds <= sample["seconds"] < seconds + 0.02  # rounded down
        assert sample["seconds"] > 1.0  # a real clip, so the end timestamp is not trivially 0
    # Evaluation passes no draw: never timestamped, whatever the probability.
    assert prepare(records[0])["labels"] == plain(records[0])["labels"]


def test_timestamp_end_is_clamped_to_thirty_seconds(processor):
    prepare = make(processor, p=1.0)
    ids = prepare.labels("the cat")
    assert processor.tokenizer.convert_ids_to_tokens(prepare.with_timestamps(ids, 30.0)[-2]) == "<|30.00|>"
    assert processor.tokenizer.convert_ids_to_tokens(prepare.with_timestamps(ids, 0.05)[-2]) == "<|0.04|>"


@pytest.mark.parametrize("p", [0.0, 0.2, 0.5])
def test_timestamped_share_matches_the_probability(processor, p):
    prepare = make(processor, p=p)
    n = 20_000
    hits = sum(prepare.timestamped(f"clip{i % 100}", i // 100) for i in range(n))
    if p == 0:
        assert hits == 0
    else:  # binomial: 5 standard deviations, a false failure about once in 3.5 million runs
        assert abs(hits - n * p) < 5 * math.sqrt(n * p * (1 - p)), hits


def test_timestamp_choice_is_a_function_of_seed_sample_and_draw(processor):
    a, b, other_seed = make(processor, p=0.5), make(processor, p=0.5), make(processor, p=0.5, seed=7)
    picks = [a.timestamped(f"c{i}", d) for i in range(50) for d in range(4)]
    assert picks == [b.timestamped(f"c{i}", d) for i in range(50) for d in range(4)]
    assert picks != [other_seed.timestamped(f"c{i}", d) for i in range(50) for d in range(4)]
    # Epochs differ: the same sample is timestamped in some epochs and not others.
    assert any(len({a.timestamped(f"c{i}", d) for d in range(4)}) == 2 for i in range(50))


def test_draws_are_the_same_whatever_the_number_of_processes():
    one = {i: d for batch in TrainBatches(40, 4, seed=3).epoch_batches(1, draws=True) for i, d in batch}
    two = {i: d for r in (0, 1) for batch in TrainBatches(40, 4, seed=3, rank=r, world=2).epoch_batches(1, draws=True)
           for i, d in batch}
    assert one == two and sorted(one.values()) == list(range(40, 80))


def test_label_limit_counts_the_timestamp_tokens(processor):
    tok = processor.tokenizer
    text = "the cat " * 100
    plain_len = len(tok(" " + clean_text(text)).input_ids)
    limit = plain_len  # fits exactly without timestamps, one token too long with them
    plain = Prepare(processor.feature_extractor, tok, max_label_tokens=limit)
    timed = Prepare(processor.feature_extractor, tok, max_label_tokens=limit, timestamp_probability=0.2)
    assert not isinstance(plain.labels(text), Bad)
    bad = timed.labels(text)
    assert isinstance(bad, Bad) and bad.reason == "transcript over 448 tokens"


def test_a_tokenizer_without_notimestamps_is_refused(processor):
    from whisper_ft.data import DataError

    class NoTimestamps:  # no <|notimestamps|>: nothing to count the timestamp ids from
        unk_token_id = 0

        def convert_tokens_to_ids(self, tokens):
            return [0] * len(tokens) if isinstance(tokens, list) else 0

    with pytest.raises(DataError, match="timestamp_probability: 0"):
        Prepare(processor.feature_extractor, NoTimestamps(), timestamp_probability=0.2)
    Prepare(processor.feature_extractor, NoTimestamps())  # p = 0 needs none


def unnamed_twin(processor):
    """The fixture's tokenizer built again from the same texts without <|0.00|> ... <|30.00|>."""
    from conftest import CV_AS
    from whisper_ft import tiny

    texts = tiny.texts_from_tsv(CV_EN / "validated.tsv") + tiny.texts_from_tsv(CV_AS / "train.tsv")
    tok = tiny.build_tokenizer(texts, named_timestamps=False)
    tok.set_prefix_tokens(language="en", task="transcribe")
    return tok


def test_timestamps_without_named_tokens_use_the_ids_after_notimestamps(processor):
    named, unnamed = processor.tokenizer, unnamed_twin(processor)
    assert unnamed.convert_tokens_to_ids("<|0.00|>") == unnamed.unk_token_id  # really has no named timestamps
    assert len(unnamed) == len(named) - 1501
    records = load_records(str(CV_EN), "train")[:6]
    with_names = Prepare(processor.feature_extractor, named, timestamp_probability=1.0)
    without = Prepare(processor.feature_extractor, unnamed, timestamp_probability=1.0)  # not refused
    for draw, record in enumerate(records):
        a, b = with_names(record, draw=draw), without(record, draw=draw)
        assert a["labels"] == b["labels"]
        # ... and those ids are the named ones: <|0.00|> first, <|T|> with T the clip's length rounded down
        assert named.convert_ids_to_tokens(b["labels"][3]) == "<|0.00|>"
        end = round(math.floor(a["seconds"] / 0.02 + 1e-6) * 0.02, 2)
        assert named.convert_ids_to_tokens(b["labels"][-2]) == f"<|{end:.2f}|>"
    assert without.with_timestamps(without.labels("the cat"), 30.0)[-2] == named.convert_tokens_to_ids("<|30.00|>")


@pytest.mark.slow
def test_a_model_whose_tokenizer_names_no_timestamps_trains_them_like_one_that_does(tmp_path):
    """The default config (timestamp_probability 0.2) is not refused, and with every draw timestamped the
    losses equal those of the same model whose tokenizer names the timestamp tokens: the same label ids."""
    from conftest import base_config, run_train, train_rows
    from whisper_ft import tiny

    texts = tiny.texts_from_tsv(CV_EN / "validated.tsv")
    models = {named: tiny.build(tmp_path / f"model-{named}", texts, multilingual=False, named_timestamps=named)
              for named in (True, False)}
    runs = {}
    for named, p in ((False, None), (False, 1.0), (True, 1.0)):  # None: the config's default
        out = tmp_path / f"run-{named}-{p}"
        extra = {} if p is None else {"timestamp_probability": p}
        proc = run_train(base_config(models[named], out, max_steps=3, save_steps=3, eval_steps=3, **extra), tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[named, p] = train_rows(out)
    assert runs[True, 1.0] == runs[False, 1.0]
    assert runs[False, 1.0] != runs[False, None]  # the timestamped draws did change what was trained
