"""A deterministic, seeded vision-language world: scenes of coloured shapes seen
through a simulated object detector, and every text task generated from them.

An image is a set of 3-12 objects, each with a colour, a shape, a size (small /
medium / large) and a position.  A "detector" sees it as regions (one per object,
plus one whole-image region and 0-2 background regions, sorted by confidence):

* ``features`` (R, feat_dim) float32: ``relu(z @ W + noise)`` where z is the region's
  latent (one-hot colour, shape and size, box geometry cx, cy, w, h, and two flags for
  background / whole-image) and W a fixed random projection per world, so objects that
  share attributes have correlated features;
* ``boxes`` (R, 4) normalised ``[x1, y1, x2, y2]`` (VLBatch derives the 7-d form),
  ``conf`` (R,) detector confidences, ``width``/``height`` in pixels;
* ``soft_labels`` (R, C): a softmax over the classes -- class 0 is ``__background__``,
  class ``1 + colour * n_shapes + shape`` is the attribute combination "colour shape" --
  peaked at the true class, with detector noise and extra mass on classes that share
  the colour or the shape.

``world.images`` is a feature store (a Mapping ``img_id -> ImageRecord``, the
interface of :mod:`vlfast.data.readers`) that builds each record on access (well
under a millisecond), deterministic per image; ``world.scene(img_id)`` is the ground
truth (:class:`Scene`).

Task examples are plain dicts, per split (``"train"``, ``"val"``, ``"test"``; images
are split, seeded).  ``world.<task>(split=None)`` returns the list (``None``: all
splits); ``world.examples(task, split)`` does the same by name.  Texts are lowercase
words separated by single spaces (punctuation is its own word), so word indices are
indices into ``text.split()`` (``VLTokenizer.encode_with_word_ids`` maps them to
wordpieces).  The lists are new on every call but share their dicts: copy before
changing one.  Counts per image below are the defaults (constructor arguments).

* ``captions``: ``{"txt_id": str, "img_id": str, "text": str}`` -- 5 per image
  (template grammar: relations "left of" / "right of" / "above" / "below", counts,
  lists of objects, attribute statements).
* ``alignment``: ``{"txt_id", "img_id", "text", "word_regions": list of (word index,
  region index), "phrases": list of {"start", "end" (exclusive word indices),
  "regions": list of region indices}}`` -- one per caption, same ``txt_id``.
* ``vqa``: ``{"qid": int, "img_id", "question", "answers": 10 annotator strings,
  "target": {answer: min(1, count / 3)}, "answer": the true answer,
  "answer_type": "yes/no" | "number" | "other", "question_type": str}``.
  ``world.answer_vocab`` / ``world.answer2label`` give the answer label map.
* ``nlvr2``: ``{"identifier": str, "img_ids": (left, right), "statement": str,
  "label": bool}`` over image pairs of one split, about half true.
* ``refexp``: ``{"ref_id": int, "img_id", "text", "target_region": int}`` -- the
  expression names exactly one object; ``target_region`` indexes the ImageRecord.
* ``mc`` (VCR-style): ``{"annot_id": str, "img_id", "question", "choices": 4 strings,
  "label": int, "question_type": "relation" | "nearest", "rationale_choices": 4 strings,
  "rationale_label": int}``.  The rationales serve VCR's QA->R (the rationale given the
  right answer) and Q->AR: each is a statement "the <A> is <relation> the <B>" (or "the
  <A> is nearest to the <B>"), objects named by attributes (a form that singles the
  object out where one exists).  The right one is true of the scene and justifies the
  right answer (the answer object in the asked relation to the question's object, or
  nearest to it); the three wrong ones do not: the answer object against another
  object named in words that agree with the question's (true or false; only the image
  tells it is another object), or a statement false for the scene by the margin (the
  relation reversed, subject and object swapped, a wrong choice's object in the
  relation).  Rationales come from their own seeded stream (per ``annot_id``), so the
  other fields are those of a world without them; ``rationale_label`` is uniform over
  0..3.
* ``world.retrieval(split)``: ``{"img_ids": list, "txt_ids": list, "txt2img": {txt_id:
  img_id}, "img2txts": {img_id: [txt_id, ...]}, "texts": {txt_id: text}}``.

Questions need the image: the attributes and templates are drawn independently of
the answer (yes/no questions are balanced by construction, queried attributes are
uniform), so the answer distribution given the question text is the one given its
template; tests check that a text-only predictor does no better than the template
prior and far worse than the scene.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from vlfast.data.batch import ImageRecord
from vlfast.data.readers import FeatureStore

__all__ = ["SyntheticWorld", "SyntheticImages", "Scene", "COLOURS", "SHAPES", "SIZES",
           "COUNT_WORDS", "RELATIONS", "SUPERLATIVES", "SPLITS", "TASKS"]

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "white",
                            "black", "gray", "brown")
SHAPES: tuple[str, ...] = ("cube", "sphere", "cylinder", "cone", "ring", "star", "pyramid", "disk")
SIZES: tuple[str, ...] = ("small", "medium", "large")
COUNT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven",
                                "eight", "nine", "ten", "eleven", "twelve")
# relation -> (axis: 0 = x, 1 = y (down), sign): "A rel B" holds iff sign*(pos_A - pos_B) > margin
RELATIONS: dict[str, tuple[int, int]] = {"left of": (0, -1), "right of": (0, 1),
                                         "above": (1, -1), "below": (1, 1)}
# superlative -> (axis, sign): the matching object furthest in that direction
SUPERLATIVES: dict[str, tuple[int, int]] = {"leftmost": (0, -1), "rightmost": (0, 1),
                                            "topmost": (1, -1), "bottommost": (1, 1)}
SPLITS: tuple[str, ...] = ("train", "val", "test")
TASKS: tuple[str, ...] = ("captions", "alignment", "vqa", "nlvr2", "refexp", "mc")

_SIZE_HALF = (0.05, 0.075, 0.105)            # half extent of a box, by size
_SHAPE_ASPECT = ((1.0, 1.0), (1.0, 1.0), (0.75, 1.25), (0.9, 1.1), (1.25, 0.7), (1.05, 1.05),
                 (1.1, 0.95), (1.3, 0.6))  # (w, h) multipliers, by shape
_ATTRS = ("size", "colour", "shape")
# attribute subsets an object can be described by (a missing "shape" reads "object")
_FORMS: tuple[tuple[str, ...], ...] = (("shape",), ("colour", "shape"), ("size", "shape"),
                                       ("size", "colour", "shape"), ("colour",), ("size",),
                                       ("size", "colour"))
_TEMPLATE_WORDS = (
    "a an the is are there objects object in this image images , ? and of left right above "
    "below how many what colour shape size which nearest to exactly both contain contains "
    "more than")
_BACKGROUND, _WHOLE = -2, -1
# a relation and its reverse (mc rationales: "the relation reversed")
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
_NEAREST = "nearest to"
# a description: (attribute form, attribute values) -- words by SyntheticWorld._np
_Desc = tuple[tuple[str, ...], dict[str, int]]


@dataclass(frozen=True)
class Scene:
    """The ground truth of one image.

    Objects (n of them): ``colour``/``shape``/``size`` attribute indices and centres
    ``cx``/``cy`` in [0, 1] (y grows downwards).  Regions (R = n + 1 + n_background,
    sorted by confidence): ``boxes`` (R, 4) normalised [x1,y1,x2,y2], ``conf`` (R,),
    ``region_obj[r]`` = the object of region r, -1 for the whole image, -2 for
    background; ``obj_region[i]`` = the region of object i.
    """
    index: int
    img_id: str
    width: int
    height: int
    colour: tuple[int, ...]
    shape: tuple[int, ...]
    size: tuple[int, ...]
    cx: tuple[float, ...]
    cy: tuple[float, ...]
    boxes: np.ndarray
    conf: np.ndarray
    region_obj: tuple[int, ...]
    obj_region: tuple[int, ...]

    @property
    def n_objects(self) -> int:
        return len(self.colour)

    @property
    def n_regions(self) -> int:
        return len(self.region_obj)

    def attr(self, i: int, name: str) -> int:
        """Attribute ``name`` ("colour", "shape" or "size") of object i."""
        return getattr(self, name)[i]

    def pos(self, i: int, axis: int) -> float:
        return self.cx[i] if axis == 0 else self.cy[i]


class SyntheticImages(FeatureStore):
    """The world's images as a feature store (:class:`vlfast.data.readers.FeatureStore`):
    a read-only Mapping ``img_id -> ImageRecord`` whose records are built on access
    (deterministic per image, nothing cached), with ``num_boxes(img_id)`` /
    ``name2nbb`` / ``lengths()`` answered from the scenes without building records.
    A missing id raises ``FeatureStoreError`` (a KeyError) naming it."""

    def __init__(self, world: "SyntheticWorld") -> None:
        super().__init__()
        self._world = world
        self.path = f"<SyntheticWorld seed={world.seed}>"
        self._keys = world.img_ids

    def _read(self, key: str) -> ImageRecord:
        return self._world._record(self._world._index[key])

    def _count(self, key: str) -> int:
        return self._world._scenes[self._world._index[key]].n_regions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _holds(sc: Scene, a: int, b: int, rel: str, margin: float) -> bool:
    axis, sign = RELATIONS[rel]
    return sign * (sc.pos(a, axis) - sc.pos(b, axis)) > margin


def _towards(sc: Scene, a: int, b: int, rel: str) -> float:
    """How far object a lies from b in the direction of ``rel`` (negative: opposite)."""
    axis, sign = RELATIONS[rel]
    return sign * (sc.pos(a, axis) - sc.pos(b, axis))


class SyntheticWorld:
    """A seeded world of ``n_images`` scenes and their texts.

    Args:
        seed: non-negative int; everything (scenes, features, texts, splits) is a
            function of it.
        n_images: number of images (ids ``img000000`` ...).
        feat_dim: region feature dim F.
        n_colors, n_shapes: how many of :data:`COLOURS` / :data:`SHAPES` are used;
            ``n_classes = 1 + n_colors * n_shapes`` (background + combinations).
        min_objects, max_objects: objects per image (3-12 by default).
        feature_noise: std of the gaussian noise added to region features.
        label_noise: std of the detector's logit noise for soft labels.
        relation_margin: a relation holds when the centres differ by more than this.
        split_fractions: (train, val, test) fractions of the images.
        captions_per_image, questions_per_image, refs_per_image, mc_per_image: examples
            per image; nlvr2_per_image: NLVR2 statements per image of a split.
    """

    def __init__(self, seed: int = 0, n_images: int = 2000, feat_dim: int = 2048, *,
                 n_colors: int = 8, n_shapes: int = 6, min_objects: int = 3, max_objects: int = 12,
                 feature_noise: float = 0.3, label_noise: float = 1.0, relation_margin: float = 0.05,
                 split_fractions: Sequence[float] = (0.8, 0.1, 0.1), captions_per_image: int = 5,
                 questions_per_image: int = 5, refs_per_image: int = 3, mc_per_image: int = 2,
                 nlvr2_per_image: float = 1.0) -> None:
        def need(cond: bool, name: str, expected: str, got: Any) -> None:
            if not cond:
                raise ValueError(f"SyntheticWorld: {name}: expected {expected}, got {got!r}")

        need(isinstance(seed, (int, np.integer)) and seed >= 0, "seed", "a non-negative int", seed)
        need(isinstance(n_images, (int, np.integer)) and n_images >= 1, "n_images", "an int >= 1", n_images)
        need(isinstance(feat_dim, (int, np.integer)) and feat_dim >= 1, "feat_dim", "an int >= 1", feat_dim)
        need(2 <= n_colors <= len(COLOURS), "n_colors", f"2..{len(COLOURS)}", n_colors)
        need(2 <= n_shapes <= len(SHAPES), "n_shapes", f"2..{len(SHAPES)}", n_shapes)
        need(2 <= min_objects <= max_objects <= 12, "min_objects/max_objects",
             "2 <= min_objects <= max_objects <= 12", (min_objects, max_objects))
        need(feature_noise >= 0, "feature_noise", ">= 0", feature_noise)
        need(label_noise >= 0, "label_noise", ">= 0", label_noise)
        need(0 <= relation_margin < 0.5, "relation_margin", "in [0, 0.5)", relation_margin)
        fr = tuple(float(f) for f in split_fractions)
        need(len(fr) == 3 and min(fr) >= 0 and abs(sum(fr) - 1) < 1e-6, "split_fractions",
             "three non-negative fractions summing to 1", split_fractions)
        for name, v in (("captions_per_image", captions_per_image),
                        ("questions_per_image", questions_per_image),
                        ("refs_per_image", refs_per_image), ("mc_per_image", mc_per_image)):
            need(isinstance(v, (int, np.integer)) and v >= 0, name, "an int >= 0", v)
        need(nlvr2_per_image >= 0, "nlvr2_per_image", ">= 0", nlvr2_per_image)

        self.seed, self.n_images, self.feat_dim = int(seed), int(n_images), int(feat_dim)
        self.n_colors, self.n_shapes = int(n_colors), int(n_shapes)
        self.min_objects, self.max_objects = int(min_objects), int(max_objects)
        self.feature_noise, self.label_noise = float(feature_noise), float(label_noise)
        self.relation_margin = float(relation_margin)
        self.split_fractions = fr
        self.captions_per_image, self.questions_per_image = int(captions_per_image), int(questions_per_image)
        self.refs_per_image, self.mc_per_image = int(refs_per_image), int(mc_per_image)
        self.nlvr2_per_image = float(nlvr2_per_image)

        self.colours: tuple[str, ...] = COLOURS[:self.n_colors]
        self.shapes: tuple[str, ...] = SHAPES[:self.n_shapes]
        self.sizes: tuple[str, ...] = SIZES
        self.class_names: list[str] = ["__background__"] + [f"{c} {s}" for c in self.colours
                                                             for s in self.shapes]
        self.answer_vocab: list[str] = (["no", "yes"] + [str(k) for k in range(self.max_objects + 1)]
                                        + list(self.colours) + list(self.shapes) + list(self.sizes))
        self.answer2label: dict[str, int] = {a: i for i, a in enumerate(self.answer_vocab)}

        self.img_ids: list[str] = [f"img{i:06d}" for i in range(self.n_images)]
        self._index = {k: i for i, k in enumerate(self.img_ids)}
        self._scenes = [self._make_scene(i) for i in range(self.n_images)]
        perm = list(range(self.n_images))
        random.Random(f"vlfast.synthetic/{self.seed}/split").shuffle(perm)
        n_tr = int(round(fr[0] * self.n_images))
        n_va = int(round(fr[1] * self.n_images))
        n_va = min(n_va, self.n_images - n_tr)
        parts = (perm[:n_tr], perm[n_tr:n_tr + n_va], perm[n_tr + n_va:])
        self.splits: dict[str, list[str]] = {s: [self.img_ids[i] for i in sorted(p)]
                                             for s, p in zip(SPLITS, parts)}
        self._split_of = {k: s for s, ks in self.splits.items() for k in ks}

        # latent: one-hot colour, shape, size | cx, cy, w, h | background flag, whole-image flag
        self._lat_geo = self.n_colors + self.n_shapes + len(SIZES)
        self._lat_dim = self._lat_geo + 6
        g = np.random.default_rng([self.seed, 0])
        self._proj = (g.standard_normal((self._lat_dim, self.feat_dim), dtype=np.float32)
                      / np.float32(math.sqrt(3.0)))
        self.images = SyntheticImages(self)
        self._tasks: dict[str, list[dict[str, Any]]] = {}

    # ------------------------------------------------------------------ basics
    @property
    def n_classes(self) -> int:
        """Soft-label classes: background + one per (colour, shape)."""
        return 1 + self.n_colors * self.n_shapes

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments: ``SyntheticWorld(**world.config)`` rebuilds it."""
        return dict(seed=self.seed, n_images=self.n_images, feat_dim=self.feat_dim,
                    n_colors=self.n_colors, n_shapes=self.n_shapes, min_objects=self.min_objects,
                    max_objects=self.max_objects, feature_noise=self.feature_noise,
                    label_noise=self.label_noise, relation_margin=self.relation_margin,
                    split_fractions=list(self.split_fractions),
                    captions_per_image=self.captions_per_image,
                    questions_per_image=self.questions_per_image, refs_per_image=self.refs_per_image,
                    mc_per_image=self.mc_per_image, nlvr2_per_image=self.nlvr2_per_image)

    @property
    def lexicon(self) -> list[str]:
        """Every word the generator can write (texts, choices and answers), sorted: the
        word list of the synthetic WordPiece vocab."""
        words = set(_TEMPLATE_WORDS.split()) | set(self.colours) | set(self.sizes) | set(self.shapes)
        words |= {s + "s" for s in self.shapes} | set(COUNT_WORDS) | set(self.answer_vocab)
        words |= set(SUPERLATIVES) | {w for r in RELATIONS for w in r.split()}
        return sorted(words)

    def _index_of(self, img_id: str, what: str) -> int:
        try:
            return self._index[img_id]
        except (KeyError, TypeError):
            raise KeyError(f"SyntheticWorld.{what}: no image {img_id!r} (ids are "
                           f"{self.img_ids[0]!r}..{self.img_ids[-1]!r})") from None

    def scene(self, img_id: str) -> Scene:
        """The ground truth of image ``img_id``."""
        return self._scenes[self._index_of(img_id, "scene")]

    def split_of(self, img_id: str) -> str:
        self._index_of(img_id, "split_of")
        return self._split_of[img_id]

    # ------------------------------------------------------------------ scenes
    def _make_scene(self, idx: int) -> Scene:
        r = random.Random(f"vlfast.synthetic/{self.seed}/scene/{idx}")
        n = r.randint(self.min_objects, self.max_objects)
        colour = [r.randrange(self.n_colors) for _ in range(n)]
        shape = [r.randrange(self.n_shapes) for _ in range(n)]
        size = [r.randrange(len(SIZES)) for _ in range(n)]
        cx: list[float] = []
        cy: list[float] = []
        obj_boxes = []
        for i in range(n):
            aw, ah = _SHAPE_ASPECT[shape[i]]
            hw = _SIZE_HALF[size[i]] * aw * r.uniform(0.9, 1.1)
            hh = _SIZE_HALF[size[i]] * ah * r.uniform(0.9, 1.1)
            x = y = 0.5
            for _ in range(30):  # keep centres apart (overlap allowed when crowded)
                x, y = r.uniform(hw + 0.01, 1 - hw - 0.01), r.uniform(hh + 0.01, 1 - hh - 0.01)
                if all((x - px) ** 2 + (y - py) ** 2 >= 0.0144 for px, py in zip(cx, cy)):
                    break
            cx.append(x)
            cy.append(y)
            j = [r.gauss(0.0, 0.004) for _ in range(4)]  # detector box noise
            obj_boxes.append((x - hw + j[0], y - hh + j[1], x + hw + j[2], y + hh + j[3]))
        regions = [(i, obj_boxes[i], r.uniform(0.55, 0.99) - 0.04 * (2 - size[i])) for i in range(n)]
        regions.append((_WHOLE, (0.0, 0.0, 1.0, 1.0), r.uniform(0.3, 0.6)))
        for _ in range(r.randint(0, 2)):
            w, h = r.uniform(0.1, 0.4), r.uniform(0.1, 0.4)
            x1, y1 = r.uniform(0, 1 - w), r.uniform(0, 1 - h)
            regions.append((_BACKGROUND, (x1, y1, x1 + w, y1 + h), r.uniform(0.15, 0.45)))
        regions.sort(key=lambda t: -t[2])
        boxes = np.clip(np.array([t[1] for t in regions], np.float32), 0.0, 1.0)
        region_obj = tuple(t[0] for t in regions)
        obj_region = [0] * n
        for k, o in enumerate(region_obj):
            if o >= 0:
                obj_region[o] = k
        return Scene(index=idx, img_id=self.img_ids[idx], width=r.randint(480, 640),
                     height=r.randint(360, 640), colour=tuple(colour), shape=tuple(shape),
                     size=tuple(size), cx=tuple(cx), cy=tuple(cy), boxes=boxes,
                     conf=np.array([t[2] for t in regions], np.float32), region_obj=region_obj,
                     obj_region=tuple(obj_region))

    def _record(self, idx: int) -> ImageRecord:
        sc = self._scenes[idx]
        nc, ns, geo = self.n_colors, self.n_shapes, self._lat_geo
        R = sc.n_regions
        obj = np.array(sc.region_obj)
        z = np.zeros((R, self._lat_dim), np.float32)
        b = sc.boxes
        z[:, geo:geo + 4] = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2,
                                      b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1)
        is_obj = obj >= 0
        oi = obj[is_obj]
        rows = np.nonzero(is_obj)[0]
        col, shp, siz = np.array(sc.colour), np.array(sc.shape), np.array(sc.size)
        z[rows, col[oi]] = 1.0
        z[rows, nc + shp[oi]] = 1.0
        z[rows, nc + ns + siz[oi]] = 1.0
        z[obj == _BACKGROUND, geo + 4] = 1.0
        whole = obj == _WHOLE
        z[whole, :geo] = z[rows, :geo].mean(0)
        z[whole, geo + 5] = 1.0

        g = np.random.default_rng([self.seed, 1, idx])
        feats = z @ self._proj
        feats += np.float32(self.feature_noise) * g.standard_normal(feats.shape, dtype=np.float32)
        np.maximum(feats, 0.0, out=feats)

        C = self.n_classes
        logits = self.label_noise * g.standard_normal((R, C))
        peak = 1.5 + 4.0 * sc.conf.astype(np.float64)
        cls = 1 + col[oi] * ns + shp[oi]
        logits[rows, cls] += peak[rows]
        # confusions: classes sharing the colour or the shape
        same_col = 1 + col[oi][:, None] * ns + np.arange(ns)[None, :]
        same_shp = 1 + np.arange(nc)[None, :] * ns + shp[oi][:, None]
        np.add.at(logits, (np.repeat(rows, ns), same_col.ravel()), 1.0)
        np.add.at(logits, (np.repeat(rows, nc), same_shp.ravel()), 1.0)
        logits[~is_obj, 0] += peak[~is_obj]
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(1, keepdims=True)
        return ImageRecord(img_id=sc.img_id, features=feats, boxes=sc.boxes.copy(),
                           conf=sc.conf.copy(), soft_labels=p.astype(np.float32),
                           width=sc.width, height=sc.height)

    # ------------------------------------------------------------------ descriptions
    def _np(self, form: Sequence[str], vals: dict[str, int], plural: bool = False) -> list[str]:
        """Noun phrase words (no article): [size] [colour] shape|object, plural if asked."""
        w = []
        if "size" in form:
            w.append(SIZES[vals["size"]])
        if "colour" in form:
            w.append(self.colours[vals["colour"]])
        noun = self.shapes[vals["shape"]] if "shape" in form else "object"
        w.append(noun + "s" if plural else noun)
        return w

    @staticmethod
    def _vals(sc: Scene, i: int) -> dict[str, int]:
        return {"colour": sc.colour[i], "shape": sc.shape[i], "size": sc.size[i]}

    @staticmethod
    def _matching(sc: Scene, form: Sequence[str], vals: dict[str, int]) -> list[int]:
        return [j for j in range(sc.n_objects) if all(sc.attr(j, a) == vals[a] for a in form)]

    def _random_vals(self, r: random.Random) -> dict[str, int]:
        return {"colour": r.randrange(self.n_colors), "shape": r.randrange(self.n_shapes),
                "size": r.randrange(len(SIZES))}

    def _plain_forms(self, sc: Scene, i: int, exclude: frozenset = frozenset()) -> list[tuple[str, ...]]:
        """Attribute forms that single out object i (ignoring attributes in exclude)."""
        v = self._vals(sc, i)
        return [f for f in _FORMS if not exclude.intersection(f) and len(self._matching(sc, f, v)) == 1]

    def _describe(self, sc: Scene, i: int, r: random.Random, exclude: frozenset = frozenset(),
                  sup: bool = True, rel: bool = False, p_rel: float = 0.0,
                  p_sup: float = 0.0) -> Optional[list[str]]:
        """Words (no leading "the") of an expression that names exactly object i:
        [size] [colour] shape|object, or "<superlative> ..." or "... <relation> the <anchor>";
        attributes in ``exclude`` are never mentioned (of object i).  A relational
        (superlative) form is tried first with probability p_rel (p_sup), else only when
        no plain form is unique.  None if no expression exists."""
        v = self._vals(sc, i)
        forms = [f for f in _FORMS if not exclude.intersection(f)] + [()]
        if rel and r.random() < p_rel:
            out = self._describe_rel(sc, i, r, forms)
            if out is not None:
                return out
        sup_first = sup and r.random() < p_sup
        if sup_first:
            out = self._describe_sup(sc, i, r, forms)
            if out is not None:
                return out
        plain = [f for f in forms if f and len(self._matching(sc, f, v)) == 1]
        if plain:
            return self._np(r.choice(plain), v)
        if sup and not sup_first:
            out = self._describe_sup(sc, i, r, forms)
            if out is not None:
                return out
        if rel:
            return self._describe_rel(sc, i, r, forms)
        return None

    def _describe_sup(self, sc: Scene, i: int, r: random.Random,
                      forms: list[tuple[str, ...]]) -> Optional[list[str]]:
        """"<superlative> <np>" naming object i (clear by the margin), or None."""
        m = self.relation_margin
        v = self._vals(sc, i)
        opts = []
        for f in forms:
            M = self._matching(sc, f, v)
            if len(M) < 2:
                continue
            for name, (axis, sign) in SUPERLATIVES.items():
                me = sign * sc.pos(i, axis)
                if all(me - sign * sc.pos(j, axis) > m for j in M if j != i):
                    opts.append((name, f))
        if not opts:
            return None
        name, f = r.choice(opts)
        return [name] + self._np(f, v)

    def _describe_rel(self, sc: Scene, i: int, r: random.Random,
                      forms: list[tuple[str, ...]]) -> Optional[list[str]]:
        """"<np> <relation> the <anchor>" naming exactly object i, or None."""
        m = self.relation_margin
        v = self._vals(sc, i)
        fs = list(forms)
        r.shuffle(fs)
        rels = list(RELATIONS)
        r.shuffle(rels)
        anchors = [j for j in range(sc.n_objects) if j != i]
        r.shuffle(anchors)
        for f in fs[:3]:
            M = self._matching(sc, f, v)
            for rl in rels:
                for j in anchors:
                    if not _holds(sc, i, j, rl, 2 * m):
                        continue
                    if any(_towards(sc, k, j, rl) >= 0 for k in M if k != i and k != j):
                        continue
                    anchor = self._describe(sc, j, r, sup=False, rel=False)
                    if anchor is not None:
                        return self._np(f, v) + rl.split() + ["the"] + anchor
        return None

    # ------------------------------------------------------------------ tasks: access
    def _check_split(self, split: Optional[str], what: str) -> None:
        if split is not None and split not in SPLITS:
            raise ValueError(f"SyntheticWorld.{what}: split: expected one of {SPLITS} or None, got {split!r}")

    def examples(self, task: str, split: Optional[str] = None) -> list[dict[str, Any]]:
        """The examples of ``task`` (one of :data:`TASKS`) in ``split`` (None: all), in
        image order.  Built once per world on first use."""
        if task not in TASKS:
            raise ValueError(f"SyntheticWorld.examples: task: expected one of {TASKS}, got {task!r}")
        self._check_split(split, task)
        if task not in self._tasks:
            self._tasks[task] = self._build(task)
        exs = self._tasks[task]
        if split is None:
            return list(exs)
        if task == "nlvr2":
            return [e for e in exs if self._split_of[e["img_ids"][0]] == split]
        return [e for e in exs if self._split_of[e["img_id"]] == split]

    def captions(self, split: Optional[str] = None) -> list[dict[str, Any]]:
        return self.examples("captions", split)

    def alignments(self, split: Optional[str] = None) -> list[dict[str, Any]]:
        return self.examples("alignment", split)

    def vqa(self, split: Optional[str] = None) -> list[dict[str, Any]]:
        return self.examples("vqa", split)

    def nlvr2(self, split: Optional[str] = None) -> list[dict[str, Any]]:
        return self.examples("nlvr2", split)

    def refexp(self, split: Optional[str] = None) -> list[dict[str, Any]]:
        return self.examples("refexp", split)

    def multiple_choice(self, split: Optional[str] = None) -> list[dict[str, Any]]:
        return self.examples("mc", split)

    def retrieval(self, split: str) -> dict[str, Any]:
        """Image-text retrieval over ``split``'s images and their captions."""
        if split not in SPLITS:
            raise ValueError(f"SyntheticWorld.retrieval: split: expected one of {SPLITS}, got {split!r}")
        caps = self.captions(split)
        img2txts: dict[str, list[str]] = {k: [] for k in self.splits[split]}
        for c in caps:
            img2txts[c["img_id"]].append(c["txt_id"])
        return {"img_ids": list(self.splits[split]), "txt_ids": [c["txt_id"] for c in caps],
                "txt2img": {c["txt_id"]: c["img_id"] for c in caps}, "img2txts": img2txts,
                "texts": {c["txt_id"]: c["text"] for c in caps}}

    def _build(self, task: str) -> list[dict[str, Any]]:
        if task == "alignment":
            self.examples("captions")
            return self._tasks["alignment"]
        if task == "nlvr2":
            return [e for s in SPLITS for e in self._nlvr2_split(s)]
        out: list[dict[str, Any]] = []
        for sc in self._scenes:
            r = random.Random(f"vlfast.synthetic/{self.seed}/{task}/{sc.index}")
            out.extend(getattr(self, f"_{task}_image")(sc, r))
        if task == "captions":
            self._tasks["alignment"] = out
            return [{"txt_id": e["txt_id"], "img_id": e["img_id"], "text": e["text"]} for e in out]
        return out

    # ------------------------------------------------------------------ captions + alignment
    def _captions_image(self, sc: Scene, r: random.Random) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        specific = (self._c_relation, self._c_count_attr, self._c_list, self._c_attribute)
        for _ in range(self.captions_per_image * 6):
            if len(out) == self.captions_per_image:
                break
            clauses = [r.choice(specific)(sc, r)]
            if r.random() < 0.5:
                clauses.append(r.choice(specific + (self._c_count_all,))(sc, r))
                r.shuffle(clauses)
            clauses = [c for c in clauses if c is not None]
            if not clauses:
                continue
            words: list[str] = []
            links: list[list[int]] = []
            phrases: list[tuple[int, int, list[int]]] = []
            if r.random() < 0.15:
                words += ["in", "this", "image", ","]
                links += [[]] * 4
            for k, (cw, cl, cp) in enumerate(clauses):
                if k:
                    words.append(r.choice(("and", ",")))
                    links.append([])
                base = len(words)
                words += cw
                links += cl
                phrases += [(base + s, base + e, objs) for s, e, objs in cp]
            text = " ".join(words)
            if text in seen:
                continue
            seen.add(text)
            reg = sc.obj_region
            out.append({"txt_id": f"{sc.img_id}_c{len(out)}", "img_id": sc.img_id, "text": text,
                        "word_regions": [(w, reg[o]) for w, objs in enumerate(links) for o in sorted(objs)],
                        "phrases": [{"start": s, "end": e, "regions": sorted(reg[o] for o in objs)}
                                    for s, e, objs in phrases]})
        return out

    def _obj_phrase(self, sc: Scene, i: int, r: random.Random, article: str = "a"):
        """(words, links, phrase) of "a/the <np>" naming object i (unique when possible)."""
        forms = self._plain_forms(sc, i)
        f = r.choice(forms) if forms else ("size", "colour", "shape")
        w = self._np(f, self._vals(sc, i))
        art = _article(w[0]) if article == "a" else article
        return [art] + w, [[]] + [[i]] * len(w), (1, 1 + len(w), [i])

    def _c_relation(self, sc: Scene, r: random.Random):
        rl = r.choice(list(RELATIONS))
        pairs = [(i, j) for i in range(sc.n_objects) for j in range(sc.n_objects)
                 if i != j and _holds(sc, i, j, rl, 2 * self.relation_margin)]
        if not pairs:
            return None
        i, j = r.choice(pairs)
        wi, li, pi = self._obj_phrase(sc, i, r)
        wj, lj, pj = self._obj_phrase(sc, j, r)
        mid = ["is"] + rl.split()
        off = len(wi) + len(mid)
        return (wi + mid + wj, li + [[]] * len(mid) + lj,
                [pi, (pj[0] + off, pj[1] + off, pj[2])])

    def _c_count_all(self, sc: Scene, r: random.Random):
        n = sc.n_objects
        allo = list(range(n))
        if r.random() < 0.5:
            return (["there", "are", COUNT_WORDS[n], "objects"], [[], [], allo, allo], [(2, 4, allo)])
        return ([COUNT_WORDS[n], "objects", "in", "the", "image"], [allo, allo, [], [], []], [(0, 2, allo)])

    def _c_count_attr(self, sc: Scene, r: random.Random):
        i = r.randrange(sc.n_objects)
        f = r.choice((("colour",), ("shape",), ("colour", "shape"), ("size",), ("size", "shape")))
        v = self._vals(sc, i)
        M = self._matching(sc, f, v)
        w = self._np(f, v, plural=len(M) > 1)
        head = ["there", "are" if len(M) > 1 else "is"]
        return (head + [COUNT_WORDS[len(M)]] + w, [[], []] + [M] * (1 + len(w)),
                [(2, 3 + len(w), M)])

    def _c_list(self, sc: Scene, r: random.Random):
        k = min(sc.n_objects, r.choice((2, 3)))
        objs = r.sample(range(sc.n_objects), k)
        words: list[str] = []
        links: list[list[int]] = []
        phrases = []
        for t, i in enumerate(objs):
            if t:
                words.append("and" if t == k - 1 else ",")
                links.append([])
            wi, li, pi = self._obj_phrase(sc, i, r)
            phrases.append((pi[0] + len(words), pi[1] + len(words), pi[2]))
            words += wi
            links += li
        return words, links, phrases

    def _c_attribute(self, sc: Scene, r: random.Random):
        i = r.randrange(sc.n_objects)
        a = r.choice(("colour", "size"))
        forms = [f for f in self._plain_forms(sc, i, frozenset([a])) if "shape" in f]
        if not forms:
            return None
        w = self._np(r.choice(forms), self._vals(sc, i))
        val = self.colours[sc.colour[i]] if a == "colour" else SIZES[sc.size[i]]
        return (["the"] + w + ["is", val], [[]] + [[i]] * len(w) + [[], [i]],
                [(1, 1 + len(w), [i])])

    # ------------------------------------------------------------------ VQA
    def _vqa_image(self, sc: Scene, r: random.Random) -> list[dict[str, Any]]:
        gens = ((self._q_exist, 0.2), (self._q_count, 0.2), (self._q_attr_colour, 0.15),
                (self._q_attr_shape, 0.15), (self._q_attr_size, 0.1), (self._q_relation, 0.2))
        fns, weights = zip(*gens)
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        for _ in range(self.questions_per_image * 8):
            if len(out) == self.questions_per_image:
                break
            q = r.choices(fns, weights)[0](sc, r)
            if q is None or q[0] in seen:
                continue
            question, answer, kind, qtype = q
            seen.add(question)
            reliability = r.uniform(0.8, 1.0)
            answers = [answer if r.random() < reliability else self._confuse(answer, kind, r)
                       for _ in range(10)]
            counts: dict[str, int] = {}
            for a in answers:
                counts[a] = counts.get(a, 0) + 1
            out.append({"qid": sc.index * self.questions_per_image + len(out), "img_id": sc.img_id,
                        "question": question,
                        "answers": answers, "target": {a: min(1.0, c / 3) for a, c in counts.items()},
                        "answer": answer,
                        "answer_type": {"yesno": "yes/no", "number": "number"}.get(kind, "other"),
                        "question_type": qtype})
        return out

    def _confuse(self, answer: str, kind: str, r: random.Random) -> str:
        """A wrong annotator answer of the same kind."""
        if kind == "yesno":
            return "no" if answer == "yes" else "yes"
        if kind == "number":  # mostly off by one, sometimes anything
            n = int(answer)
            near = [k for k in (n - 1, n + 1) if 0 <= k <= self.max_objects]
            far = [k for k in range(self.max_objects + 1) if k != n]
            return str(r.choice(far if r.random() < 0.3 else near))
        pool = {"colour": self.colours, "shape": self.shapes, "size": SIZES}[kind]
        return r.choice([p for p in pool if p != answer])

    def _query_vals(self, sc: Scene, r: random.Random) -> dict[str, int]:
        """Attributes of a random object half the time, uniform otherwise."""
        return self._vals(sc, r.randrange(sc.n_objects)) if r.random() < 0.5 else self._random_vals(r)

    def _q_exist(self, sc: Scene, r: random.Random):
        f = r.choice((("colour", "shape"), ("size", "shape"), ("size", "colour", "shape"), ("colour",),
                      ("shape",)))
        # balanced within every form: "yes" asks about a random object, "no" about a
        # uniform absent value; images where the form has no absent value ask nothing
        # (dropping only the "no" would tilt short forms such as "is there a cube ?" to yes)
        absent = []
        for _ in range(30):
            v = self._random_vals(r)
            if not self._matching(sc, f, v):
                absent.append(v)
                break
        if not absent:
            return None
        if r.random() < 0.5:
            v, ans = self._vals(sc, r.randrange(sc.n_objects)), "yes"
        else:
            v, ans = absent[0], "no"
        w = self._np(f, v)
        return " ".join(["is", "there", _article(w[0])] + w + ["?"]), ans, "yesno", "is there"

    def _q_count(self, sc: Scene, r: random.Random):
        f = r.choice(((), ("colour",), ("shape",), ("colour", "shape"), ("size",), ("size", "shape")))
        v = self._query_vals(sc, r)
        w = self._np(f, v, plural=True)
        return (" ".join(["how", "many"] + w + ["are", "there", "?"]),
                str(len(self._matching(sc, f, v))), "number", "how many")

    def _q_attr(self, sc: Scene, r: random.Random, attr: str):
        i = r.randrange(sc.n_objects)
        d = self._describe(sc, i, r, exclude=frozenset([attr]), sup=True, rel=True, p_rel=0.3,
                           p_sup=0.15)
        if d is None:
            return None
        ans = {"colour": self.colours, "shape": self.shapes, "size": SIZES}[attr][sc.attr(i, attr)]
        return " ".join(["what", attr, "is", "the"] + d + ["?"]), ans, attr, f"what {attr} is the"

    def _q_attr_colour(self, sc: Scene, r: random.Random):
        return self._q_attr(sc, r, "colour")

    def _q_attr_shape(self, sc: Scene, r: random.Random):
        return self._q_attr(sc, r, "shape")

    def _q_attr_size(self, sc: Scene, r: random.Random):
        return self._q_attr(sc, r, "size")

    def _q_relation(self, sc: Scene, r: random.Random):
        rl = r.choice(list(RELATIONS))
        m = self.relation_margin
        pairs = [(i, j) for i in range(sc.n_objects) for j in range(sc.n_objects)
                 if i != j and abs(_towards(sc, i, j, rl)) > 2 * m]
        if not pairs:
            return None
        i, j = r.choice(pairs)
        # no superlatives here: "is the leftmost X left of ..." would leak the answer
        di = self._describe(sc, i, r, sup=False)
        dj = self._describe(sc, j, r, sup=False)
        if di is None or dj is None:
            return None
        ans = "yes" if _holds(sc, i, j, rl, m) else "no"
        return (" ".join(["is", "the"] + di + rl.split() + ["the"] + dj + ["?"]), ans, "yesno",
                "is the")

    # ------------------------------------------------------------------ referring expressions
    def _refexp_image(self, sc: Scene, r: random.Random) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        targets = list(range(sc.n_objects))
        r.shuffle(targets)
        for i in targets:
            if len(out) == self.refs_per_image:
                break
            d = self._describe(sc, i, r, sup=True, rel=True, p_rel=0.35, p_sup=0.2)
            if d is None:
                continue
            out.append({"ref_id": sc.index * self.refs_per_image + len(out), "img_id": sc.img_id,
                        "text": " ".join(["the"] + d), "target_region": sc.obj_region[i]})
        return out

    # ------------------------------------------------------------------ multiple choice
    def _mc_image(self, sc: Scene, r: random.Random) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        for _ in range(self.mc_per_image * 8):
            if len(out) == self.mc_per_image:
                break
            q = self._mc_relation(sc, r) if r.random() < 0.6 else self._mc_nearest(sc, r)
            if q is None or q[0] in seen:
                continue
            question, correct, banned, ref_form, ref_vals, qtype, ref, rel = q
            seen.add(question)
            correct_t = self._triple(sc, correct)
            in_image = {self._triple(sc, k) for k in range(sc.n_objects)}

            def ok(t: tuple[int, int, int], chosen: list) -> bool:
                tv = {"size": t[0], "colour": t[1], "shape": t[2]}
                return (t != correct_t and t not in banned and t not in chosen
                        and not all(tv[a] == ref_vals[a] for a in ref_form))

            distract: list[tuple[int, int, int]] = []
            pool = sorted(in_image)
            r.shuffle(pool)
            for _t in range(200):
                if len(distract) == 3:
                    break
                if pool and r.random() < 0.5:
                    t = pool.pop()
                else:
                    v = self._random_vals(r)
                    t = (v["size"], v["colour"], v["shape"])
                if ok(t, distract):
                    distract.append(t)
            if len(distract) < 3:
                continue
            label = r.randrange(4)
            triples = distract[:label] + [correct_t] + distract[label:]
            choices = []
            for t in triples:
                w = self._np(("size", "colour", "shape"), {"size": t[0], "colour": t[1], "shape": t[2]})
                choices.append(" ".join([_article(w[0])] + w))
            annot_id = f"{sc.img_id}-mc{len(out)}"
            rationales, r_label = self._mc_rationales(sc, annot_id, ref, (ref_form, ref_vals), correct,
                                                      rel, distract)
            out.append({"annot_id": annot_id, "img_id": sc.img_id,
                        "question": question, "choices": choices, "label": label,
                        "question_type": qtype, "rationale_choices": rationales,
                        "rationale_label": r_label})
        return out

    # -- rationales (their own random stream: the fields above never depend on them)
    def _mc_rationales(self, sc: Scene, annot_id: str, ref: int, ref_desc: _Desc, correct: int, rel: str,
                       distract: list[tuple[int, int, int]]) -> tuple[list[str], int]:
        """(4 rationale strings, the right one's index) of one mc item: object ``correct``
        (the right answer) is ``rel`` (a relation, or "nearest to") object ``ref``, which
        the question names by ``ref_desc``; ``distract`` are the wrong choices' (size,
        colour, shape) triples.  Drawn from the item's own stream
        ``Random("vlfast.synthetic/<seed>/mc_rationale/<annot_id>")``.

        The right rationale names ``ref`` by another form than the question's where it
        has one.  Up to two wrong ones put the answer in the relation to another object,
        named by a form whose words agree with the question's (only the image tells that
        it is not the question's object; the statement may be true or false, it does not
        justify the answer); the others are clearly false, one kind at a time from the
        kinds a text reader can rule out: the relation reversed, subject and object
        swapped, a wrong choice's object in the relation."""
        r = random.Random(f"vlfast.synthetic/{self.seed}/mc_rationale/{annot_id}")
        forms: dict[int, list[tuple[str, ...]]] = {}  # object -> the forms that single it out

        def unique_forms(i: int) -> list[tuple[str, ...]]:
            if i not in forms:  # as _plain_forms(sc, i): no other object shares the form's values
                shared = [frozenset(a for a in _ATTRS if sc.attr(k, a) == sc.attr(i, a))
                          for k in range(sc.n_objects) if k != i]
                forms[i] = [f for f in _FORMS if not any(sh.issuperset(f) for sh in shared)]
            return forms[i]

        def name(i: int, allowed: Optional[list[tuple[str, ...]]] = None) -> _Desc:
            """Object i by a random form among ``allowed`` (default: every form that singles
            it out), or by its full (size, colour, shape) when there is none."""
            fs = unique_forms(i) if allowed is None else allowed
            return (r.choice(fs) if fs else _ATTRS), self._vals(sc, i)

        def name_triple(t: tuple[int, int, int]) -> _Desc:
            """The objects with (size, colour, shape) t: the one object's description when
            exactly one has it, else the full triple."""
            vals = {"size": t[0], "colour": t[1], "shape": t[2]}
            M = self._matching(sc, _ATTRS, vals)
            return name(M[0]) if len(M) == 1 else (_ATTRS, vals)

        qform, qvals = ref_desc
        ref_forms = [f for f in unique_forms(ref) if f != tuple(qform)] or unique_forms(ref)
        right = (name(correct), rel, name(ref, ref_forms))
        if self._fact(sc, right[0], rel, right[2]) is not True:
            raise RuntimeError(f"SyntheticWorld: {annot_id}: the right rationale "
                               f"{self._fact_text(*right)!r} is not clearly true of the scene")
        seen = {self._fact_text(*right)}
        wrong: list[str] = []

        def take(cand: tuple[_Desc, str, _Desc], true_ok: bool = False) -> bool:
            """Keep a candidate that is new and clearly false for the scene (or, with
            ``true_ok``, clearly true: a fact about another object justifies nothing)."""
            text = self._fact_text(*cand)
            fact = self._fact(sc, *cand)
            if text in seen or fact is None or (fact and not true_ok):
                return False
            seen.add(text)
            wrong.append(text)
            return True

        # the answer against another object, named in words that agree with the question's
        others = [k for k in range(sc.n_objects) if k not in (ref, correct)]
        r.shuffle(others)
        hidden = []
        for k in others:
            agree = [f for f in unique_forms(k)
                     if all(sc.attr(k, a) == qvals[a] for a in f if a in qform)]
            if agree:
                hidden.append((k, agree))
        for k, agree in hidden:
            if len(wrong) == 2:
                break
            take((name(correct), rel, name(k, agree)), true_ok=True)
        # the kinds a text reader can rule out, one of each kind in turn (in random order)
        kinds: list[list[tuple[Any, str, int]]] = [[(t, rel, ref) for t in distract], [(ref, rel, correct)]]
        if rel in _OPPOSITE:
            kinds.append([(correct, _OPPOSITE[rel], ref)])
        r.shuffle(kinds)
        while len(wrong) < 3 and any(kinds):
            for g in kinds:
                while g and len(wrong) < 3:
                    a, rl, b = g.pop(0)
                    if take((name_triple(a) if isinstance(a, tuple) else name(a), rl, name(b))):
                        break
        if len(wrong) < 3:  # cannot happen: every wrong choice's object is clearly not the answer
            raise RuntimeError(f"SyntheticWorld: {annot_id}: found {len(wrong)} false rationales, need 3")
        r.shuffle(wrong)
        label = r.randrange(4)
        return wrong[:label] + [self._fact_text(*right)] + wrong[label:], label

    def _fact_text(self, subj: _Desc, rel: str, anchor: _Desc) -> str:
        """"the <subj> is <rel> the <anchor>"."""
        return " ".join(["the"] + self._np(*subj) + ["is"] + rel.split() + ["the"] + self._np(*anchor))

    def _fact(self, sc: Scene, subj: _Desc, rel: str, anchor: _Desc) -> Optional[bool]:
        """Truth of "the <subj> is <rel> the <anchor>" on the scene: True when some pair
        (x, y) of distinct objects matching the descriptions clearly holds (a relation:
        x lies more than the margin beyond y; "nearest to": every other object is at
        least the margin further from y than x), False when every pair clearly fails (x
        lies on the other side of y; another object is at least the margin nearer to
        y), None otherwise (a near tie)."""
        m = self.relation_margin
        pairs = [(x, y) for x in self._matching(sc, subj[0], subj[1])
                 for y in self._matching(sc, anchor[0], anchor[1]) if x != y]
        verdicts = []
        for x, y in pairs:
            if rel == _NEAREST:
                d = math.hypot(sc.cx[x] - sc.cx[y], sc.cy[x] - sc.cy[y])
                rest = [math.hypot(sc.cx[z] - sc.cx[y], sc.cy[z] - sc.cy[y])
                        for z in range(sc.n_objects) if z not in (x, y)]
                verdicts.append(True if all(o - d >= m for o in rest)
                                else False if any(d - o >= m for o in rest) else None)
            else:
                t = _towards(sc, x, y, rel)
                verdicts.append(True if t > m else False if t < 0 else None)
        if any(v is True for v in verdicts):
            return True
        if all(v is False for v in verdicts):
            return False
        return None

    @staticmethod
    def _triple(sc: Scene, i: int) -> tuple[int, int, int]:
        return (sc.size[i], sc.colour[i], sc.shape[i])

    def _mc_ref(self, sc: Scene, r: random.Random):
        i = r.randrange(sc.n_objects)
        forms = self._plain_forms(sc, i)
        if not forms:
            return None
        f = r.choice(forms)
        return i, f, self._vals(sc, i)

    def _mc_relation(self, sc: Scene, r: random.Random):
        ref = self._mc_ref(sc, r)
        if ref is None:
            return None
        i, f, v = ref
        rl = r.choice(list(RELATIONS))
        m = self.relation_margin
        cand = [j for j in range(sc.n_objects) if j != i and _holds(sc, j, i, rl, m)]
        if not cand:
            return None
        correct = r.choice(cand)
        # triples of every object that is (or nearly is) in the relation can't be distractors
        banned = {self._triple(sc, k) for k in range(sc.n_objects) if k != i and _towards(sc, k, i, rl) >= 0}
        q = " ".join(["which", "object", "is"] + rl.split() + ["the"] + self._np(f, v) + ["?"])
        return q, correct, banned, f, v, "relation", i, rl

    def _mc_nearest(self, sc: Scene, r: random.Random):
        ref = self._mc_ref(sc, r)
        if ref is None:
            return None
        i, f, v = ref
        dist = sorted((math.hypot(sc.cx[j] - sc.cx[i], sc.cy[j] - sc.cy[i]), j)
                      for j in range(sc.n_objects) if j != i)
        if len(dist) < 2 or dist[1][0] - dist[0][0] < self.relation_margin:
            return None
        correct = dist[0][1]
        q = " ".join(["which", "object", "is", "nearest", "to", "the"] + self._np(f, v) + ["?"])
        return q, correct, set(), f, v, "nearest", i, _NEAREST

    # ------------------------------------------------------------------ NLVR2
    def _nlvr2_split(self, split: str) -> list[dict[str, Any]]:
        ids = [self._index[k] for k in self.splits[split]]
        n = int(round(self.nlvr2_per_image * len(ids)))
        if len(ids) < 2 or n == 0:
            return []
        r = random.Random(f"vlfast.synthetic/{self.seed}/nlvr2/{split}")
        out: list[dict[str, Any]] = []
        templates = (self._s_exact, self._s_both, self._s_one, self._s_more, self._s_relation)
        for _ in range(50 * n):  # bounded: a degenerate world may yield fewer than n
            if len(out) == n:
                break
            want = r.random() < 0.5
            tmpl = r.choice(templates)
            params = tmpl(None, None, r, None)  # (None, None): draw the template's parameters
            for _ in range(40):
                a, b = r.sample(ids, 2)
                res = tmpl(self._scenes[a], self._scenes[b], r, params)
                if res is not None and res[1] == want:
                    out.append({"identifier": f"{split}-{len(out)}",
                                "img_ids": (self.img_ids[a], self.img_ids[b]),
                                "statement": res[0], "label": want})
                    break
        return out

    def _pair_vals(self, sa: Scene, sb: Scene, r: random.Random) -> dict[str, int]:
        if r.random() < 0.5:
            sc = sa if r.random() < 0.5 else sb
            return self._vals(sc, r.randrange(sc.n_objects))
        return self._random_vals(r)

    _S_FORMS = (("colour",), ("shape",), ("colour", "shape"), ("size",), ("size", "shape"))

    def _s_exact(self, sa, sb, r, params):
        if params is None:
            return (r.choice(("left", "right")), r.randint(1, 3), r.choice(self._S_FORMS))
        side, k, f = params
        v = self._pair_vals(sa, sb, r)
        sc = sa if side == "left" else sb
        words = ["the", side, "image", "contains", "exactly", COUNT_WORDS[k]] + self._np(f, v, plural=k > 1)
        return " ".join(words), len(self._matching(sc, f, v)) == k

    def _s_both(self, sa, sb, r, params):
        if params is None:
            return r.choice(self._S_FORMS)
        v = self._pair_vals(sa, sb, r)
        w = self._np(params, v)
        truth = bool(self._matching(sa, params, v)) and bool(self._matching(sb, params, v))
        return " ".join(["both", "images", "contain", _article(w[0])] + w), truth

    def _s_one(self, sa, sb, r, params):
        if params is None:
            return r.choice(self._S_FORMS)
        v = self._pair_vals(sa, sb, r)
        w = self._np(params, v)
        truth = bool(self._matching(sa, params, v)) != bool(self._matching(sb, params, v))
        return " ".join(["exactly", "one", "image", "contains", _article(w[0])] + w), truth

    def _s_more(self, sa, sb, r, params):
        if params is None:
            return r.choice(self._S_FORMS)
        v = self._pair_vals(sa, sb, r)
        words = (["there", "are", "more"] + self._np(params, v, plural=True)
                 + ["in", "the", "left", "image", "than", "in", "the", "right", "image"])
        return " ".join(words), len(self._matching(sa, params, v)) > len(self._matching(sb, params, v))

    def _s_relation(self, sa, sb, r, params):
        if params is None:
            forms = (("colour", "shape"), ("shape",), ("colour",))
            return (r.choice(("left", "right")), r.choice(list(RELATIONS)), r.choice(forms), r.choice(forms))
        side, rl, f1, f2 = params
        sc = sa if side == "left" else sb
        v1, v2 = self._pair_vals(sa, sb, r), self._pair_vals(sa, sb, r)
        M1, M2 = self._matching(sc, f1, v1), self._matching(sc, f2, v2)
        d = [_towards(sc, i, j, rl) for i in M1 for j in M2 if i != j]
        if any(x > self.relation_margin for x in d):
            truth = True
        elif all(x < 0 for x in d):
            truth = False
        else:
            return None  # nearly in the relation: ambiguous
        w1, w2 = self._np(f1, v1), self._np(f2, v2)
        words = (["the", side, "image", "contains", _article(w1[0])] + w1 + rl.split()
                 + [_article(w2[0])] + w2)
        return " ".join(words), truth
