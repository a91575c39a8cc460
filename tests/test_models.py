"""Tests for nsa_compile.models: tiny Qwen2.5-VL, video inputs, decoding, loading."""

import wave

import pytest
import torch

from nsa_compile.models import (
    CLIP_MEAN,
    CLIP_STD,
    SPECIAL_TOKENS,
    VideoDecodeError,
    build_video_inputs,
    decode_video,
    load_pretrained,
    sample_video_path,
    smart_resize,
    tiny_qwen2_5_vl,
)


@pytest.fixture(scope="module")
def tiny():
    return tiny_qwen2_5_vl(seed=0, num_layers=2)


@pytest.fixture(scope="module")
def sample_frames():
    return decode_video(sample_video_path(), num_frames=2)


def test_tokenizer_ids_match_config(tiny):
    model, proc = tiny
    tok, cfg = proc.tokenizer, model.config
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    assert len(set(ids.values())) == len(SPECIAL_TOKENS)
    assert cfg.video_token_id == ids["<|video_pad|>"]
    assert cfg.image_token_id == ids["<|image_pad|>"]
    assert cfg.vision_start_token_id == ids["<|vision_start|>"]
    assert cfg.text_config.eos_token_id == ids["<|im_end|>"]
    assert cfg.text_config.pad_token_id == ids["<|endoftext|>"]
    assert max(ids.values()) < cfg.text_config.vocab_size
    text = "<|im_start|>user\nhello<|im_end|>"
    assert tok.decode(tok(text)["input_ids"]) == text


def test_forward_on_real_video(tiny, sample_frames):
    model, proc = tiny
    assert sample_frames.dtype == torch.uint8 and sample_frames.shape[1:] == (720, 1280, 3)
    inputs = build_video_inputs(proc, sample_frames, "What happens?", max_pixels=64 * 28 * 28)
    ids, grid = inputs["input_ids"], inputs["video_grid_thw"]
    assert ids.dtype == torch.long and ids.ndim == 2 and ids.shape[0] == 1
    n_video = int((ids == model.config.video_token_id).sum())
    assert n_video == int(grid.prod()) // 4
    assert inputs["pixel_values_videos"].shape == (int(grid.prod()), 3 * 2 * 14 * 14)
    with torch.no_grad():
        feats = model.model.get_video_features(inputs["pixel_values_videos"], grid).pooler_output
        logits = model(**inputs).logits
    assert sum(f.shape[0] for f in feats) == n_video
    assert logits.shape == (1, ids.shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()


def test_patch_layout_matches_qwen2_vl():
    """Row = (t, h-block, w-block, h-in-block, w-in-block); column = (c, dt, y, x)."""
    _, proc = tiny_qwen2_5_vl(num_layers=1)
    g = torch.Generator().manual_seed(0)
    video = torch.randint(0, 256, (4, 56, 84, 3), dtype=torch.uint8, generator=g)  # no resize
    inputs = build_video_inputs(proc, video, "x")
    gt, gh, gw = inputs["video_grid_thw"][0].tolist()
    assert (gt, gh, gw) == (2, 4, 6)
    pix = inputs["pixel_values_videos"].view(-1, 3, 2, 14, 14)
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    pix = (pix * std.view(1, 3, 1, 1, 1) + mean.view(1, 3, 1, 1, 1)) * 255
    row = 0
    for t in range(gt):
        for bh in range(gh // 2):
            for bw in range(gw // 2):
                for ih in range(2):
                    for iw in range(2):
                        y, x = (bh * 2 + ih) * 14, (bw * 2 + iw) * 14
                        want = video[2 * t:2 * t + 2, y:y + 14, x:x + 14].permute(3, 0, 1, 2).float()
                        torch.testing.assert_close(pix[row], want, atol=1e-3, rtol=0)
                        row += 1


def test_default_token_budget_and_aspect():
    _, proc = tiny_qwen2_5_vl(num_layers=1)
    h, w = smart_resize(720, 1280)
    assert (h % 28, w % 28) == (0, 0)
    assert abs(w / h - 1280 / 720) < 0.1
    video = torch.zeros(8, 720, 1280, 3, dtype=torch.uint8)
    inputs = build_video_inputs(proc, video, "Describe the video.")
    n = int((inputs["input_ids"] == proc.video_token_id).sum())
    assert 3000 <= n <= 5000
    small = smart_resize(720, 1280, max_pixels=100 * 28 * 28)
    assert small[0] * small[1] <= 100 * 28 * 28


def test_build_rejects_bad_video(tiny):
    with pytest.raises(ValueError):
        build_video_inputs(tiny[1], torch.zeros(2, 56, 56, 3), "x")  # float, not uint8


def test_frame_counts_are_even():
    path = sample_video_path()
    assert decode_video(path, num_frames=3).shape[0] == 4
    assert decode_video(path, num_frames=2).shape[0] == 2
    by_fps = decode_video(path, num_frames=None, fps=1.0)  # ~5.3 s clip -> 5 -> 6 frames
    assert by_fps.shape[0] % 2 == 0 and 4 <= by_fps.shape[0] <= 6


def test_decode_missing_file(tmp_path):
    missing = tmp_path / "nope.mp4"
    with pytest.raises(VideoDecodeError, match="nope.mp4"):
        decode_video(missing)


def test_decode_garbage_file(tmp_path):
    junk = tmp_path / "junk.mp4"
    noise = torch.randint(0, 256, (8192,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    junk.write_bytes(noise.numpy().tobytes())
    with pytest.raises(VideoDecodeError, match="junk.mp4"):
        decode_video(junk)
    assert issubclass(VideoDecodeError, ValueError)


def test_decode_audio_only_file(tmp_path):
    path = tmp_path / "tone.wav"
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(8000)
        f.writeframes(b"\x00\x00" * 800)
    with pytest.raises(VideoDecodeError, match="tone.wav"):
        decode_video(path)


def test_load_pretrained(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_pretrained(str(tmp_path / "missing"), torch.float32, "cpu")
    model, proc = tiny_qwen2_5_vl(num_layers=1)
    model.save_pretrained(tmp_path)
    proc.tokenizer.save_pretrained(tmp_path)
    loaded, lproc = load_pretrained(str(tmp_path), torch.float32, "cpu")
    assert type(loaded) is type(model)
    inputs = build_video_inputs(lproc, torch.zeros(2, 56, 56, 3, dtype=torch.uint8), "hi")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)
