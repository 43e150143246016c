"""vlfast.data.tokenization: BERT's WordPiece vocab against known wordpieces/ids and the
packaged HF fast tokenizer, truncation rules, word ids, the synthetic vocab, save/load."""
from __future__ import annotations

import json

import pytest

from vlfast.data.synthetic import SyntheticWorld
from vlfast.data.tokenization import SPECIAL_TOKENS, VLTokenizer, build_vocab, load_wordpiece


@pytest.fixture(scope="module")
def bert_dir():
    from vlfast.models.base import bert_checkpoint_dir

    return bert_checkpoint_dir()  # the test extra installs it; its ImportError says so


@pytest.fixture(scope="module")
def bert(bert_dir):
    return load_wordpiece(bert_dir / "vocab.txt")


def test_bert_known_sentence(bert):
    # ids read off bert-base-uncased's vocab.txt (line number - 1)
    s = "The man is riding a horse."
    assert bert.tokenize(s) == ["the", "man", "is", "riding", "a", "horse", "."]
    assert bert.encode(s) == [101, 1996, 2158, 2003, 5559, 1037, 3586, 1012, 102]
    # a word outside the vocab splits into wordpieces (BERT's own README example)
    assert bert.tokenize("unaffable") == ["una", "##ffa", "##ble"]
    assert bert.encode("unaffable") == [101, 14477, 20961, 3468, 102]
    # uncased BERT lowercases and strips accents
    assert bert.tokenize("Naïve CAFÉ") == ["naive", "cafe"]
    assert bert.decode(bert.encode(s)) == "the man is riding a horse."
    assert bert.decode(bert.encode(s), skip_special=False) == "[CLS] the man is riding a horse. [SEP]"


def test_bert_special_ids(bert):
    assert (bert.pad_id, bert.unk_id, bert.cls_id, bert.sep_id, bert.mask_id) == (0, 100, 101, 102, 103)
    assert bert.special == {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
    assert bert.vocab_size == len(bert) == 30522
    # [unused0..98]=1..99 and [unused99..993]=104..998 are placeholders: random
    # replacement draws from the first real token ("!" = 999) to the end
    assert bert.random_token_ids == range(999, 30522)
    assert bert.convert_ids_to_tokens([998, 999]) == ["[unused993]", "!"]
    assert len(bert.special_ids) == 999 and max(bert.special_ids) == 998
    # [MASK] written in a text stays one token
    assert bert.encode("a [MASK] dog") == [101, 1037, 103, 3899, 102]
    assert bert.convert_tokens_to_ids(["dog", "not-a-token"]) == [3899, 100]


def test_bert_matches_packaged_fast_tokenizer(bert, bert_dir):
    from tokenizers import Tokenizer

    ref = Tokenizer.from_file(str(bert_dir / "tokenizer.json"))
    ref.no_padding()
    ref.no_truncation()
    texts = ["A man riding a horse on a beach.", "Two dogs play with a frisbee!!",
             "Is the woman's umbrella red?", "héllo wörld -- 3.5 km/h, isn't it", "x" * 120,
             "The  quick\tbrown\nfox", ""]
    for t in texts:
        assert bert.encode(t) == ref.encode(t).ids, t
    assert bert.encode_batch(texts) == [ref.encode(t).ids for t in texts]
    a, b = "what is on the table ?", "a red apple and a knife"
    ids, types = bert.encode_pair(a, b)
    e = ref.encode(a, b)
    assert ids == e.ids and types == e.type_ids


def test_truncation(bert):
    s = "one two three four five"  # 5 wordpieces
    assert bert.encode(s, max_len=4) == [101, 2028, 2048, 102]
    assert bert.encode(s, max_len=7) == bert.encode(s) and len(bert.encode(s)) == 7
    assert bert.encode_batch([s, "one"], max_len=4) == [[101, 2028, 2048, 102], [101, 2028, 102]]
    assert bert.encode("", max_len=2) == [101, 102]
    # pairs: longest first, ties removed from b.  a = 5 tokens, b = 2; max_len 9 -> budget 6
    a, b = s, "six seven"
    ids, types = bert.encode_pair(a, b, max_len=9)
    assert bert.convert_ids_to_tokens(ids) == ["[CLS]", "one", "two", "three", "four", "[SEP]", "six",
                                               "seven", "[SEP]"]
    assert types == [0] * 6 + [1] * 3
    # budget 3: a cut 5 -> 2 (equal), then one more from b (tie): a=2, b=1
    ids, types = bert.encode_pair(a, b, max_len=6)
    assert bert.convert_ids_to_tokens(ids) == ["[CLS]", "one", "two", "[SEP]", "six", "[SEP]"]
    assert types == [0, 0, 0, 0, 1, 1]
    # b longer: a = 1, b = 4, budget 2 -> b to 1 (equal)... a=1, b=1
    ids, _ = bert.encode_pair("one", "two three four five", max_len=5)
    assert bert.convert_ids_to_tokens(ids) == ["[CLS]", "one", "[SEP]", "two", "[SEP]"]
    # the closed form equals the token-at-a-time loop for every split of every budget
    for la in range(6):
        for lb in range(6):
            for budget in range(la + lb + 1):
                x, y = la, lb
                while x + y > budget:
                    if x > y:
                        x -= 1
                    else:
                        y -= 1
                ids, types = bert.encode_pair(" ".join(["one"] * la), " ".join(["two"] * lb), budget + 3)
                assert ids.count(2028) == x and ids.count(2048) == y, (la, lb, budget)


def test_word_ids(bert):
    text = "a  red-cube , Unaffable"
    ids, wid = bert.encode_with_word_ids(text)
    toks = bert.convert_ids_to_tokens(ids)
    assert toks == ["[CLS]", "a", "red", "-", "cube", ",", "una", "##ffa", "##ble", "[SEP]"]
    assert wid == [-1, 0, 1, 1, 1, 2, 3, 3, 3, -1]  # indices into text.split()
    ids2, wid2 = bert.encode_with_word_ids(text, max_len=5)
    assert ids2 == ids[:4] + [102] and wid2 == wid[:4] + [-1]


def test_errors(bert, tmp_path):
    with pytest.raises(ValueError, match="max_len"):
        bert.encode("a", max_len=1)
    with pytest.raises(ValueError, match="max_len"):
        bert.encode_pair("a", "b", max_len=2)
    with pytest.raises(TypeError, match="text"):
        bert.encode(["a"])
    with pytest.raises(ValueError, match="id 30522"):
        bert.decode([30522])
    with pytest.raises(FileNotFoundError, match="vocab_path"):
        load_wordpiece(tmp_path / "nope.txt")
    (tmp_path / "v.txt").write_text("[PAD]\n[UNK]\n[CLS]\nhello\n")
    with pytest.raises(ValueError, match=r"missing \['\[SEP\]', '\[MASK\]'\]"):
        load_wordpiece(tmp_path / "v.txt")
    with pytest.raises(ValueError, match="appears twice"):
        VLTokenizer(list(SPECIAL_TOKENS) + ["a", "a"])
    with pytest.raises(ValueError, match="no ordinary token"):
        VLTokenizer(list(SPECIAL_TOKENS))
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        VLTokenizer.from_dir(tmp_path / "empty")


def test_build_vocab_by_hand():
    v = build_vocab(["the cube , the cone", "The CUBE?"])
    # specials, then words by count (the 3, cube 2, then , cone ? at 1 alphabetically),
    # then characters alone and as continuations (those not already words)
    assert v[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert v[5:10] == ["the", "cube", ",", "?", "cone"]
    chars = sorted(set("thecubcon"))  # "," and "?" are words already
    assert v[10:] == chars + ["##,", "##?"] + ["##" + c for c in chars]
    tok = VLTokenizer(v)
    assert tok.encode("the cone ?") == [2, 5, 9, 8, 3]
    assert tok.tokenize("bet") == ["b", "##e", "##t"]  # unseen word: characters, not [UNK]
    assert tok.tokenize("bez") == ["[UNK]"]            # an unseen character: [UNK]
    assert tok.random_token_ids == range(5, len(v))
    assert build_vocab(["a a b"], min_freq=2)[5] == "a" and "b" not in build_vocab(["a a b"], min_freq=2)[:6]
    with pytest.raises(ValueError, match="min_freq"):
        build_vocab(["a"], min_freq=0)


def test_synthetic_vocab_covers_world_and_round_trips(tmp_path):
    world = SyntheticWorld(seed=3, n_images=80)
    tok = VLTokenizer.for_synthetic(world)
    assert tok.special == {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
    assert tok.vocab_size < 200
    texts = ([e["text"] for e in world.captions()] + [e["question"] for e in world.vqa()]
             + [e["statement"] for e in world.nlvr2()] + [e["text"] for e in world.refexp()]
             + [c for e in world.multiple_choice() for c in [e["question"]] + e["choices"]]
             + world.answer_vocab)
    for t in texts:
        ids, wid = tok.encode_with_word_ids(t)
        # every word is one whole token: no [UNK], no splitting
        assert tok.unk_id not in ids, t
        assert len(ids) == len(t.split()) + 2 and wid[1:-1] == list(range(len(t.split())))
        # the WordPiece decoder's cleanup glues punctuation to the word before it
        assert tok.decode(ids) == t.replace(" ,", ",").replace(" ?", "?"), t
    # save -> from_dir gives the same tokenizer; files are what HF's BertTokenizer reads
    tok.save(tmp_path / "ckpt")
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["tokenizer_config.json", "vocab.txt"]  # no temporary files left
    assert (tmp_path / "ckpt" / "vocab.txt").read_text().split("\n")[:-1] == tok.vocab
    assert json.loads((tmp_path / "ckpt" / "tokenizer_config.json").read_text())["do_lower_case"] is True
    back = VLTokenizer.from_dir(tmp_path / "ckpt")
    assert back.vocab == tok.vocab and back.lowercase
    assert back.encode_batch(texts[:50]) == tok.encode_batch(texts[:50])
    # the vocab depends only on the world's lexicon, not on its seed or size
    assert VLTokenizer.for_synthetic(SyntheticWorld(seed=9, n_images=5)).vocab == tok.vocab
    with pytest.raises(TypeError, match="lexicon"):
        VLTokenizer.for_synthetic(object())


def test_cased_save_load(bert_dir, tmp_path):
    cased = load_wordpiece(bert_dir / "vocab.txt", lowercase=False)
    assert cased.tokenize("The") != ["the"]  # uncased vocab: "The" is not a token
    cased.save(tmp_path)
    assert VLTokenizer.from_dir(tmp_path).lowercase is False
