"""Moderation (issues 12 and 16) at its edges: characters the tokenizer splits off that must not
hide a banned word, a classifier that gives NaN or cannot load, and the dedicated upscaler
reading a forced negative prompt when the result says it did."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from redis import Redis

from core.jobs import Delivery, ImageModeration, JobRequest, SourceImage
from core.matcher import find_banned
from settings.config import Settings

CPU = torch.device("cpu")
TERMS = ("nude", "banned", "gore")


# -- issue 12 item 2: the matcher's word boundaries vs the tokenizer's -------------------------
@pytest.fixture(scope="module")
def clip_words():
    """The words CLIP reads (its normalizer, then its pre-tokenizer), as tests/test_matcher.py."""
    from worker.tiny import build_tokenizer

    backend = build_tokenizer().backend_tokenizer

    def words(text: str) -> list[str]:
        normalized = backend.normalizer.normalize_str(text)
        return [normalized[a:b] for _, (a, b) in backend.pre_tokenizer.pre_tokenize_str(normalized)]
    return words


# A symbol or a number that is not a letter for CLIP (\p{L}) splits the word off for the
# tokenizer, but the matcher folds it to ASCII letters (™ → "tm", × → "x", ⓧ → "x") or keeps
# it as a "word" character (Python's \w includes No/Nl numbers), gluing it to the banned word.
@pytest.mark.parametrize("text, word", [
    ("nude™", "nude"),  # TRADE MARK SIGN (So): folds to "tm"
    ("banned™", "banned"),
    ("gore℠", "gore"),  # SERVICE MARK (So): "sm"
    ("2×nude", "nude"),  # MULTIPLICATION SIGN (Sm): "x"
    ("nude×2", "nude"),
    ("ⓧnude", "nude"),  # CIRCLED LATIN SMALL LETTER X (So)
    ("nude№1", "nude"),  # NUMERO SIGN (So): "no"
    ("ↀnude", "nude"),  # ROMAN NUMERAL ONE THOUSAND C D (Nl): \w for Python, \p{N} for CLIP
    ("nude〇", "nude"),  # IDEOGRAPHIC NUMBER ZERO (Nl): folds to "o"
    ("፲banned", "banned"),  # ETHIOPIC NUMBER TEN (No)
    ("gore௰", "gore"),  # TAMIL NUMBER TEN (No)
    # Zero-width/format characters and standalone combining marks are pieces of their own for
    # CLIP (after its NFC), but the matcher deletes them, gluing the next letter onto the word.
    ("nude\u200bx", "nude"),  # ZERO WIDTH SPACE
    ("x\u200bnude", "nude"),
    ("nude\u00ads", "nude"),  # SOFT HYPHEN
    ("banned\u2060s", "banned"),  # WORD JOINER
    ("nude\u0336x", "nude"),  # COMBINING LONG STROKE OVERLAY
    ("x\u0336nude", "nude"),
    ("banned\u0489s", "banned"),  # COMBINING CYRILLIC MILLIONS SIGN (Me)
])
def test_a_symbol_or_number_the_tokenizer_splits_off_does_not_hide_a_banned_word(clip_words, text, word):
    assert word in clip_words(text)  # the model reads the banned word on its own
    assert find_banned(text, TERMS) == word


# -- issue 16: a classifier that fails on a job fails closed, never open ------------------------
@pytest.fixture(scope="module")
def checker_dir(tmp_path_factory):
    from worker.tiny import write_tiny_safety_checker

    return write_tiny_safety_checker(tmp_path_factory.mktemp("audit-checker") / "checker")


def _checker(folder, threshold: float = 0.0):
    from worker.safety import load_safety_checker

    return load_safety_checker(Settings(_env_file=None, safety_source=str(folder), safety_threshold=threshold),
                               CPU, torch.float32)


def _request(**fields) -> JobRequest:
    return JobRequest(**{**dict(job_id="audit", model="tiny", prompt="p", steps=2, guidance=7.5, seed=1,
                                size=64, count=2), **fields})


def test_a_classifier_that_returns_nan_scores_fails_closed(checker_dir):
    """NaN scores (an fp16 overflow, broken weights) are a failed check: ``nan > threshold`` is
    False, so today every image counts as clean and is shown in a server that blocks."""
    from worker.generate import Generation
    from worker.safety import moderate

    checker = _checker(checker_dir)
    checker.model.visual_projection.weight.data.fill_(float("nan"))
    images = [Image.new("RGB", (64, 64), (40 * i, 0, 0)) for i in range(2)]
    assert all(math.isnan(s) for s in checker.scores(images))
    moderated = moderate(checker, _request(nsfw_action="block"), Generation(images, [1, 2], 1.0, 0.0))
    assert moderated.actions == ["withhold", "withhold"]


def test_a_nan_threshold_does_not_switch_output_moderation_off(checker_dir):
    """IMAGINE_SAFETY_THRESHOLD=nan is accepted today and makes ``score > nan`` False for every
    image: nothing is ever flagged, in every server, silently. Refuse it at start, or fail closed."""
    from pydantic import ValidationError

    from worker.generate import Generation
    from worker.safety import moderate

    try:
        Settings(_env_file=None, safety_threshold=float("nan"))
    except ValidationError:
        return  # refused as a setting: the worker cannot start with it
    checker = _checker(checker_dir, threshold=float("nan"))
    images = [Image.new("RGB", (64, 64), (40 * i, 0, 0)) for i in range(2)]
    moderated = moderate(checker, _request(nsfw_action="block"), Generation(images, [1, 2], 1.0, 0.0))
    assert moderated.actions == ["withhold", "withhold"]


# -- issue 16: a classifier that fails to load is one clear line at worker start -----------------
def _truncate_weights(folder):
    for path in (folder / "safety_checker").iterdir():
        if path.suffix in (".safetensors", ".bin"):
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])  # an interrupted download


def _other_architecture(folder):
    import json

    config = folder / "safety_checker" / "config.json"
    data = json.loads(config.read_text())
    data["projection_dim"] = int(data.get("projection_dim", 8)) * 2  # weights no longer fit
    config.write_text(json.dumps(data))


@pytest.mark.parametrize("damage", [_truncate_weights, _other_architecture])
def test_a_damaged_classifier_is_a_one_line_operator_error(tmp_path, damage):
    """worker.main turns only ModelLoadError into one line; a truncated safetensors file
    (SafetensorError) or weights of another shape (RuntimeError) escape as a traceback."""
    from worker.pipelines import ModelLoadError
    from worker.tiny import write_tiny_safety_checker

    folder = write_tiny_safety_checker(tmp_path / "checker")
    damage(folder)
    with pytest.raises(ModelLoadError) as error:
        _checker(folder)
    assert "IMAGINE_SAFETY_SOURCE" in str(error.value) and "\n" not in str(error.value)


# -- issue 12 item 1: never "policy applied" when the forced negative was not read -------------
@pytest.fixture(scope="module")
def upscaler_dir(tmp_path_factory):
    from worker.tiny import write_tiny_upscaler

    return write_tiny_upscaler(tmp_path_factory.mktemp("audit-upscaler") / "tiny-upscaler")


def test_an_upscale_on_the_dedicated_upscaler_is_not_labelled_policy_applied_unless_it_applied_it(
        tiny_model_dir, upscaler_dir, redis_server, monkeypatch):
    """With IMAGINE_UPSCALER_SOURCE set, Upscale ×2 of an SD 1.x result runs the latent upscaler
    at guidance 0 (worker.upscaler.GUIDANCE): the negative prompt, the server's forced part
    included, is never read. The result must then not say "(server policy applied)" — or the
    upscaler must run with guidance that reads it."""
    from worker import results, source_image
    from worker.batching import images_for
    from worker.delivery import Posted
    from worker.generate import reproducibility
    from worker.main import load_pipelines
    from worker.runtime import WorkerRuntime
    from worker.tasks import job_result

    settings = Settings(_env_file=None, device="cpu", warmup=False, worker_models=["tiny"],
                        upscaler_source=str(upscaler_dir), queue_prefix="audit-up",
                        models={"tiny": {"source": str(tiny_model_dir), "pipeline": "StableDiffusionPipeline",
                                         "native_size": 64, "variant": None}})
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    monkeypatch.setattr(source_image, "load_source", lambda source, width, height, *_: source_image.SourceInput(
        source_image.fit(picture, width, height), "f" * 64, picture.size))
    outcomes = SimpleNamespace(record=lambda *args, **kwargs: None, get=lambda job_id: None)
    runtime = WorkerRuntime(pipelines=load_pipelines(settings), redis=Redis.from_url(redis_server.url),
                            outcomes=outcomes, settings=settings)
    assert runtime.pipelines.upscaler is not None

    def upscale(job_id: str, negative: str) -> tuple[JobRequest, object]:
        request = JobRequest(
            job_id=job_id, model="tiny", prompt="an orange cat", negative_prompt=negative, steps=4,
            guidance=7.5, seed=3, width=128, height=128, mode="upscale", strength=0.3,
            source=SourceImage(url="https://cdn.discordapp.com/attachments/1/2/cat.png"),
            forced_negative_applied=True,
            delivery=Delivery(application_id=1, interaction_id=2, user_id=3, channel_id=4))
        generation = images_for(runtime, request, None)
        return request, dataclasses.replace(
            generation, moderation=(ImageModeration(score=-1.0, flagged=False, action="show"),))

    request, generation = upscale("audit-up-a", "nsfw, gore, blurry")
    _, other = upscale("audit-up-b", "a completely different negative prompt, watermark")
    negative_read = not np.array_equal(np.asarray(generation.images[0]), np.asarray(other.images[0]))

    embeds = []
    monkeypatch.setattr(results, "deliver_result",
                        lambda delivery, content, embed, *args, **kwargs: embeds.append(embed) or Posted(9, "webhook"))
    record = reproducibility(runtime.pipelines.entries["tiny"], runtime.pipelines.get_img2img("tiny"),
                             request, generation)
    results.post_result(runtime, request, generation, job_result(request, generation, record), None)
    labels = [field.name for field in embeds[0].fields]
    assert negative_read or "Negative prompt (server policy applied)" not in labels, labels
