"""The synthetic embedded default: MOSI-shaped data, generated from a seed, in which alignment matters.

Owns `generate_sentiment` (language / audio / vision
regression, the shape of MMSA's MOSI `unaligned_50.pkl`) and `generate_image_text` (two-modality
classification for AlignMamba-2 experiments; `write_image_text_npz` stores it in the `features_npz` layout).
Its settings, the `data.synthetic` sub-config, are `alignmamba_jax.config.default_synthetic_config()`.

Generative story of `generate_sentiment` (every random choice below comes from `seed`):

World (shared by all splits). A vocabulary of `vocab_size` words. Word w has a polarity p_w drawn from
{-1, -0.5, 0, 0.5, 1} and an identity code c_w, a random unit vector in R^code_dim. A further code c_sil marks
silence; the [CLS] and [SEP] text tokens carry it too. Each modality m sees the codes through its own fixed
random linear map and mean shift (language: R_l in R^{768 x (code_dim+1+16)} applied to [c_w, p_w, r_w] with a
random per-word nuisance vector r_w; audio: 5 x (code_dim+1) orthogonal columns, each scaled by a random
factor in [0.7, 1.5], applied to [c_w, a]; vision: the same with 20 x (code_dim+1), applied to [c_w, v]), so
the same word is linearly recoverable from every modality, but the modalities' feature distributions differ
(rotated, scaled, shifted): the MMD term has something to pull together.

Sample. n words w_1..w_n, n uniform in [min_words, max_words]. Text tokens: [CLS], w_1..w_n, [SEP], then zero
padding to `text_len` (mask = first n+2 tokens); a token's features are its word's embedding plus Gaussian
noise (`text_noise`). On a continuous timeline, word j lasts a log-normal duration
(sigma `duration_sigma`), a pause may follow it (probability `pause_prob`), and the utterance starts after a
random lead-in of up to `max_lead_in` of the speech time and ends with a random tail. Audio has n_a valid
frames and vision n_v (each uniform in [`min_frac`, 1] of its padded length, independently: as in the real
unaligned files, audio and video have different lengths and rates). Frame i of modality m sits at time
(i + 0.5) / n_m * duration; a frame inside word j's span shows [c_{w_j}, a_j] (audio) or [c_{w_j}, v_j] (vision)
through the modality's map, a frame in a pause / lead-in / tail shows [c_sil, 0]; Gaussian noise
(`frame_noise`) is added to every valid frame; padded frames are zero.
Per word, an audio emphasis a_j and a visual emphasis v_j are drawn uniform in [-1, 1].

Label. y = 3 tanh(sum_j p_{w_j} (text_weight + a_j + v_j) / sqrt(n)) + N(0, label_noise^2), clipped to
[-3, 3]. Sentiment is an interaction between a word's language content (its polarity) and the audio/visual
cue inside THAT word's frames. Without alignment the product cannot be formed: pooling each modality
separately loses which emphasis belongs to which word; uniform resampling of the frames to the text length
mixes neighbouring words, because word durations, pauses and the lead-in are random; with alignment (each
frame to the text token of the same code: 1 - cosine after per-modality linear maps recovers it) the label is
a sum of per-token products. The text-only part (text_weight) is what a language-only model can get.
Measured on the defaults (seed 0; ridge least squares on the train split, R^2 on test; features: the mean
over text tokens j of PCA-8(text_j) (x) [1, audio_j, vision_j], audio_j / vision_j the frames attached to token
j; tests/test_data_synthetic.py has the probe): oracle alignment (the generator's word spans) 0.89,
frames assigned by 1 - cosine after least-squares linear maps (the relaxed-OT rule) 0.50, uniform segment-mean
resampling to the text length 0.08, no alignment (frame means) 0.06, text only 0.21.
"""
from __future__ import annotations

import ml_collections
import numpy as np

from alignmamba_jax.config import default_synthetic_config
from alignmamba_jax.data.validate import SPLITS
from alignmamba_jax.errors import UserError


def _resolve(config) -> ml_collections.ConfigDict:
    c = default_synthetic_config()
    if config is not None:
        unknown = set(config.keys()) - set(c.keys())
        if unknown:
            raise UserError(f"data.synthetic: unknown keys {sorted(unknown)}; known: {sorted(c.keys())}")
        c.update(dict(config))
    if min(c.audio_dim, c.vision_dim, c.text_dim, c.image_dim, c.caption_dim) < c.code_dim + 1:
        raise UserError(
            f"data.synthetic: text_dim ({c.text_dim}), audio_dim ({c.audio_dim}), vision_dim ({c.vision_dim}), "
            f"image_dim ({c.image_dim}), caption_dim ({c.caption_dim}) must all be >= code_dim + 1 = {c.code_dim + 1}")
    if not 1 <= c.min_words <= c.max_words <= c.text_len - 2:
        raise UserError(f"data.synthetic: need 1 <= min_words ({c.min_words}) <= max_words ({c.max_words})"
                        f" <= text_len - 2 ({c.text_len - 2})")
    return c


def _orthonormal_columns(rng, rows, cols):
    q, _ = np.linalg.qr(rng.standard_normal((rows, cols)))
    return q


def _spread_codes(rng, n, d):
    """n unit vectors in R^d, greedily spread out (farthest point among random candidates)."""
    cand = rng.standard_normal((64 * n, d))
    cand /= np.linalg.norm(cand, axis=1, keepdims=True)
    chosen = [0]
    best_cos = cand @ cand[0]
    for _ in range(n - 1):
        chosen.append(int(np.argmin(best_cos)))
        best_cos = np.maximum(best_cos, cand @ cand[chosen[-1]])
    return cand[chosen]


class _World:
    """The fixed vocabulary and per-modality maps (see the module docstring)."""

    def __init__(self, c, rng):
        k = c.code_dim
        self.codes = _spread_codes(rng, c.vocab_size + 1, k)  # last row: silence
        self.polarity = rng.choice(np.array([-1.0, -0.5, 0.0, 0.5, 1.0]), size=c.vocab_size)
        nuisance = min(16, c.text_dim - (k + 1))  # per-word directions the other modalities do not see
        text_map = _orthonormal_columns(rng, c.text_dim, k + 1 + nuisance) * np.sqrt(c.text_dim / (k + 1))
        self.text_shift = 0.5 * rng.standard_normal(c.text_dim)
        vocab_in = np.concatenate(
            [self.codes[:-1], self.polarity[:, None], 0.5 * rng.standard_normal((c.vocab_size, nuisance))], 1)
        special = np.concatenate([np.repeat(self.codes[-1:], 2, 0), np.zeros((2, 1)),
                                  0.5 * rng.standard_normal((2, nuisance))], 1)  # [CLS], [SEP]
        self.text_embed = np.concatenate([vocab_in, special], 0) @ text_map.T + self.text_shift
        self.cls, self.sep = c.vocab_size, c.vocab_size + 1
        self.audio_map = _orthonormal_columns(rng, c.audio_dim, k + 1) * rng.uniform(0.7, 1.5, k + 1)
        self.audio_shift = rng.standard_normal(c.audio_dim)
        self.vision_map = _orthonormal_columns(rng, c.vision_dim, k + 1) * rng.uniform(0.7, 1.5, k + 1)
        self.vision_shift = rng.standard_normal(c.vision_dim)


def _frames(times, starts, ends, word_ids, emphasis, codes, fmap, shift, noise, rng):
    """Features of frames at `times`: the code and emphasis of the word whose span holds the frame."""
    j = np.searchsorted(starts, times, side="right") - 1
    inside = (j >= 0) & (times < ends[np.clip(j, 0, None)])
    src = np.zeros((len(times), codes.shape[1] + 1))
    src[:, :-1] = codes[-1]
    src[inside, :-1] = codes[word_ids[j[inside]]]
    src[inside, -1] = emphasis[j[inside]]
    x = src @ fmap.T + shift + noise * rng.standard_normal((len(times), fmap.shape[0]))
    return x.astype(np.float32), np.where(inside, j, -1)


def _word_means(frames, owner, t_text):
    """(N, T, d) frames -> (N, t_text, d): token j gets the mean of the frames whose word is token j."""
    out = np.zeros((frames.shape[0], t_text, frames.shape[2]), np.float32)
    for s in range(frames.shape[0]):
        for j in range(1, t_text):
            sel = owner[s] == j
            if sel.any():
                out[s, j] = frames[s, sel].mean(0)
    return out


def _sentiment_split(c, world, n, rng, name):
    t_l, t_a, t_v = c.text_len, c.audio_len, c.vision_len
    text = np.zeros((n, t_l, c.text_dim), np.float32)
    audio = np.zeros((n, t_a, c.audio_dim), np.float32)
    vision = np.zeros((n, t_v, c.vision_dim), np.float32)
    text_len = np.zeros(n, np.int32)
    audio_len = np.zeros(n, np.int32)
    vision_len = np.zeros(n, np.int32)
    labels = np.zeros(n, np.float32)
    # word index (into text tokens, 1-based; 0 = silence) of each valid frame: the oracle alignment
    audio_word = np.full((n, t_a), -1, np.int16)
    vision_word = np.full((n, t_v), -1, np.int16)
    token_ids = np.zeros((n, t_l), np.int32)
    for s in range(n):
        n_words = int(rng.integers(c.min_words, c.max_words + 1))
        words = rng.integers(0, c.vocab_size, n_words)
        dur = rng.lognormal(0.0, c.duration_sigma, n_words)
        pause = np.where(rng.random(n_words) < c.pause_prob, rng.uniform(0.2, 1.5, n_words), 0.0)
        speech = dur.sum() + pause.sum()
        lead = rng.uniform(0.0, c.max_lead_in) * speech
        tail = rng.uniform(0.0, 0.5 * c.max_lead_in) * speech
        starts = lead + np.concatenate([[0.0], np.cumsum(dur + pause)[:-1]])
        ends = starts + dur
        total = lead + speech + tail
        a_emph = rng.uniform(-1.0, 1.0, n_words)
        v_emph = rng.uniform(-1.0, 1.0, n_words)

        ids = np.concatenate([[world.cls], words, [world.sep]])
        token_ids[s, :n_words + 2] = ids
        text[s, :n_words + 2] = world.text_embed[ids] + c.text_noise * rng.standard_normal(
            (n_words + 2, c.text_dim))
        text_len[s] = n_words + 2
        for feats, lens, word_of, t_max, fmap, shift, emph in (
                (audio, audio_len, audio_word, t_a, world.audio_map, world.audio_shift, a_emph),
                (vision, vision_len, vision_word, t_v, world.vision_map, world.vision_shift, v_emph)):
            n_frames = int(rng.integers(int(np.ceil(c.min_frac * t_max)), t_max + 1))
            times = (np.arange(n_frames) + 0.5) / n_frames * total
            x, j = _frames(times, starts, ends, words, emph, world.codes, fmap, shift, c.frame_noise, rng)
            feats[s, :n_frames] = x
            lens[s] = n_frames
            word_of[s, :n_frames] = j + 1
        raw = np.sum(world.polarity[words] * (c.text_weight + a_emph + v_emph)) / np.sqrt(n_words)
        labels[s] = 3.0 * np.tanh(raw) + c.label_noise * rng.standard_normal()
    labels = np.clip(labels, -3.0, 3.0).astype(np.float32)
    t_idx = np.arange(t_l)
    if c.aligned:
        audio, vision = _word_means(audio, audio_word, t_l), _word_means(vision, vision_word, t_l)
        audio_len = vision_len = text_len
        audio_word = vision_word = np.where(t_idx[None] < text_len[:, None], t_idx[None], -1).astype(np.int16)
        t_a = t_v = t_l
    return {
        "text": text, "text_mask": t_idx[None] < text_len[:, None],
        "audio": audio, "audio_mask": np.arange(t_a)[None] < audio_len[:, None],
        "vision": vision, "vision_mask": np.arange(t_v)[None] < vision_len[:, None],
        "labels": labels,
        "ids": np.array([f"synthetic_{name}_{i:05d}" for i in range(n)]),
        # generator truth, for analysis and tests (not model inputs)
        "audio_word": audio_word, "vision_word": vision_word, "token_ids": token_ids,
    }


def generate_sentiment(config=None) -> dict:
    """MOSI-shaped regression splits {"train","valid","test"} from `config.seed` (see module docstring).

    Each split holds text/audio/vision float32 (N, T, d), *_mask bool (N, T), labels float32 (N,) in [-3, 3],
    ids (N,) str, plus the generator's truth: token_ids (N, T_text) and audio_word / vision_word (N, T):
    for each frame the 1-based text position of its word, 0 for silence, -1 for padding.
    """
    c = _resolve(config)
    world_seq, *split_seqs = np.random.SeedSequence(c.seed).spawn(1 + len(SPLITS))
    world = _World(c, np.random.default_rng(world_seq))
    sizes = {"train": c.n_train, "valid": c.n_valid, "test": c.n_test}
    return {name: _sentiment_split(c, world, sizes[name], np.random.default_rng(seq), name)
            for name, seq in zip(SPLITS, split_seqs)}


def generate_image_text(config=None) -> dict:
    """Two-modality classification splits ("image" patches, "text" tokens), `num_classes` classes.

    Story: an image has `image_len` patches of which n_obj (2..6) show objects; a caption mentions the same
    objects in a random order among filler words. Object o has an identity code (seen by both modalities
    through different linear maps, with modality-specific shifts) and, per sample, a caption polarity
    (+1/-1, carried by the caption token) and a visual intensity in [0, 1] (carried by the patch). The class
    is the tercile of sum over objects of polarity x intensity: it needs matching each caption token to the
    patch of the same object. Texts are right padded (n_tokens in [n_obj + 2, caption_len]).
    """
    c = _resolve(config)
    world_seq, *split_seqs = np.random.SeedSequence([c.seed, 1]).spawn(1 + len(SPLITS))
    rng_w = np.random.default_rng(world_seq)
    n_objects, k = 16, c.code_dim
    codes = _spread_codes(rng_w, n_objects + 1, k)  # last: background / filler
    img_map = _orthonormal_columns(rng_w, c.image_dim, k + 1) * 2.0
    txt_map = _orthonormal_columns(rng_w, c.caption_dim, k + 1) * 2.0
    img_shift, txt_shift = rng_w.standard_normal(c.image_dim), rng_w.standard_normal(c.caption_dim)
    sizes = {"train": c.n_train, "valid": c.n_valid, "test": c.n_test}
    out = {}
    for name, seq in zip(SPLITS, split_seqs):
        rng, n = np.random.default_rng(seq), sizes[name]
        image = np.zeros((n, c.image_len, c.image_dim), np.float32)
        text = np.zeros((n, c.caption_len, c.caption_dim), np.float32)
        text_len = np.zeros(n, np.int32)
        score = np.zeros(n)
        for s in range(n):
            n_obj = int(rng.integers(2, 7))
            objs = rng.choice(n_objects, n_obj, replace=False)
            pol = rng.choice([-1.0, 1.0], n_obj)
            inten = rng.uniform(0.0, 1.0, n_obj)
            patch_src = np.tile(np.append(codes[-1], 0.0), (c.image_len, 1))
            patch_src[rng.choice(c.image_len, n_obj, replace=False)] = np.c_[codes[objs], inten]
            n_tok = int(rng.integers(n_obj + 2, c.caption_len + 1))
            tok_src = np.tile(np.append(codes[-1], 0.0), (n_tok, 1))
            tok_src[rng.choice(n_tok, n_obj, replace=False)] = np.c_[codes[objs], pol]
            image[s] = patch_src @ img_map.T + img_shift + c.frame_noise * rng.standard_normal(image.shape[1:])
            text[s, :n_tok] = tok_src @ txt_map.T + txt_shift + c.text_noise * rng.standard_normal(
                (n_tok, c.caption_dim))
            text_len[s] = n_tok
            score[s] = np.sum(pol * inten)
        out[name] = {"image": image, "image_mask": np.ones((n, c.image_len), bool),
                     "text": text, "text_mask": np.arange(c.caption_len)[None] < text_len[:, None],
                     "score": score, "ids": np.array([f"synthetic_{name}_{i:05d}" for i in range(n)])}
    # class boundaries: terciles (generally quantiles) of the train score, so classes are balanced
    edges = np.quantile(out["train"]["score"], np.linspace(0, 1, c.num_classes + 1)[1:-1])
    for split in out.values():
        split["labels"] = np.searchsorted(edges, split.pop("score")).astype(np.int32)
    return out


def write_image_text_npz(directory, config=None):
    """Write `generate_image_text(config)` as train/valid/test.npz (the `features_npz` layout)."""
    from alignmamba_jax.data.features_npz import save_features_npz
    save_features_npz(directory, generate_image_text(config))
