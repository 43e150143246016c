"""Every store layout (and UNITER's text DB) reads the same records in DataLoader
workers (fork, the Linux default) as in the parent, also after the parent has read from
it -- py-lmdb refuses to open a file its registry says is "already open in this
process", and a forked child inherits the parent's registry (issue 15, item 3)."""
from __future__ import annotations

import multiprocessing as mp
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vlfast.data.batch import ImageRecord
from vlfast.data.readers import (NpzFolderStore, TsvFeatureStore, UniterFeatureStore, VilbertFeatureStore,
                                 open_feature_store, write_npz_folder, write_tsv, write_uniter_lmdb,
                                 write_vilbert_lmdb)
from vlfast.data.textdb import TxtDb, write_txt_db

pytestmark = pytest.mark.skipif(sys.platform != "linux" or "fork" not in mp.get_all_start_methods(),
                                reason="DataLoader workers by fork")


def make_records(n: int = 6, seed: int = 0) -> list[ImageRecord]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        nb = (3, 14, 25, 7, 12)[i % 5]
        xy = rng.uniform(0, 0.5, (nb, 2)).astype(np.float32)
        boxes = np.concatenate([xy, xy + rng.uniform(0.05, 0.5, (nb, 2)).astype(np.float32)], 1)
        out.append(ImageRecord(img_id=f"img_{i:03d}", features=rng.normal(size=(nb, 16)).astype(np.float32),
                               boxes=boxes, conf=rng.uniform(0, 1, nb).astype(np.float32),
                               soft_labels=rng.dirichlet(np.ones(5), nb).astype(np.float32),
                               width=int(rng.integers(200, 900)), height=int(rng.integers(200, 900))))
    return out


def _stores(tmp_path: Path) -> dict[str, object]:
    recs = make_records()
    return {
        "uniter-npz": UniterFeatureStore(write_uniter_lmdb(tmp_path / "un", recs, keep_all=True), conf_th=0.0,
                                         min_bb=1),
        "uniter-msgpack-dir": open_feature_store(write_uniter_lmdb(tmp_path / "um", recs, conf_th=0.3, max_bb=20,
                                                                   min_bb=2, compress=False).parent),
        "vilbert": VilbertFeatureStore(write_vilbert_lmdb(tmp_path / "vil", recs)),
        "vilbert-b64": open_feature_store(write_vilbert_lmdb(tmp_path / "vb", recs, base64_fields=True)),
        "tsv-butd": TsvFeatureStore(write_tsv(tmp_path / "b.tsv", recs)),
        "tsv-lxmert": open_feature_store(write_tsv(tmp_path / "l.tsv", recs, variant="lxmert")),
        "npz": NpzFolderStore(write_npz_folder(tmp_path / "npz", recs)),
        "txt_db": TxtDb(write_txt_db(tmp_path / "txt", {f"t{i}": {"input_ids": list(range(i + 2)),
                                                                  "img_fname": r.img_id, "target": i % 2}
                                                        for i, r in enumerate(recs)})),
    }


class _Reads(torch.utils.data.Dataset):
    def __init__(self, store, keys):
        self.store, self.keys = store, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int):
        key = self.keys[i]
        return key, self.store[key], os.getpid(), (self.store.num_boxes(key) if hasattr(self.store, "num_boxes")
                                                   else None)


def _first(samples):
    return samples[0]


def _same(a, b) -> None:
    if isinstance(a, dict):
        assert a == b
        return
    for f in ("features", "boxes", "conf", "soft_labels"):
        x, y = getattr(a, f), getattr(b, f)
        assert (x is None) == (y is None), f
        if x is not None:
            np.testing.assert_array_equal(x, y, err_msg=f)
    assert (a.img_id, a.width, a.height) == (b.img_id, b.width, b.height)


@pytest.mark.parametrize("layout", ["uniter-npz", "uniter-msgpack-dir", "vilbert", "vilbert-b64", "tsv-butd",
                                    "tsv-lxmert", "npz", "txt_db"])
def test_workers_read_what_the_parent_reads(tmp_path, layout):
    store = _stores(tmp_path)[layout]
    keys = list(store.keys())
    first = store[keys[0]]  # the parent reads first: its LMDB environment / file handle is open at fork
    expected = {k: store[k] for k in keys}
    loader = torch.utils.data.DataLoader(_Reads(store, keys), batch_size=1, num_workers=2, collate_fn=_first,
                                         multiprocessing_context="fork")
    for epoch in range(2):  # the second epoch forks again, from a parent that read in between
        seen, pids = [], set()
        for key, rec, pid, nbb in loader:
            _same(rec, expected[key])
            if nbb is not None:
                assert nbb == store.num_boxes(key)
            seen.append(key)
            pids.add(pid)
        assert seen == keys and os.getpid() not in pids and len(pids) == 2, (epoch, pids)
        _same(store[keys[0]], first)  # the parent's handle still works after its children closed theirs


def test_train_cli_on_uniter_store_with_two_workers(tmp_path, capsys):
    """``python -m vlfast.train ... data.source=uniter data.num_workers=2`` (in-process):
    the job reads the stores in this process, then the workers fork."""
    from vlfast.train import main
    from vlfast.training.config import load_config
    from vlfast.training.jobs import SyntheticSource

    small = ["data.options.n_images=60", "data.batch_size=4", "data.eval_batch_size=16", "logging.every=1",
             "logging.progress=off", "checkpoint.every=0", "device=cpu", "logging.tensorboard=null",
             "model.config.hidden_size=32", "model.config.num_hidden_layers=1", "model.config.intermediate_size=64",
             "model.config.num_attention_heads=2", "optim.lr_multipliers={}"]
    source = SyntheticSource(load_config("default_pretrain", small).data.options)
    ids = list(source.records.keys())[:24]
    recs = [source.records[i] for i in ids]
    feat_dir, txt_dir, tok = tmp_path / "img_db", tmp_path / "txt_db", source.tokenizer
    write_uniter_lmdb(feat_dir, recs, conf_th=-1, num_bb=int(min(r.num_boxes for r in recs)))
    write_txt_db(txt_dir, {str(k): {"input_ids": tok.encode(f"a scene number {k % 5}")[1:-1], "img_fname": i}
                           for k, i in enumerate(ids)}, meta={"v_range": [5, tok.vocab_size]})
    tok.save(tmp_path / "tok")
    rc = main(["--config", "default_pretrain", "--run-dir", str(tmp_path / "run")] + small + [
        "data.source=uniter", f"data.path={feat_dir}", "data.num_workers=2", "optim.total_steps=2", "eval.every=0",
        "tasks={mlm: 1.0}",
        f"data.options={{txt_db: {txt_dir}, val_txt_db: {txt_dir}, vocab: {tmp_path / 'tok' / 'vocab.txt'}, "
        f"num_region_classes: {source.num_region_classes}}}"])
    out = capsys.readouterr()
    assert rc == 0, out.out[-3000:] + out.err[-3000:]
    assert "done: step 2" in out.out
