"""The model catalog and its overrides, settings, and option validation into a job request."""

from __future__ import annotations

import pytest

from core.jobs import JobRequest, job_id_for_interaction, queue_name
from core.validation import (
    Defaults,
    ImagineOptions,
    InvalidRequest,
    build_request,
    resolve_options,
)
from settings.catalog import build_catalog
from settings.config import Settings


def test_catalog_has_the_four_seed_models():
    catalog = build_catalog()
    assert {k: (e.source, e.pipeline, e.native_size) for k, e in catalog.items()} == {
        "bk-sdm-small": ("nota-ai/bk-sdm-small", "StableDiffusionPipeline", 512),
        "sd-v1-4": ("CompVis/stable-diffusion-v1-4", "StableDiffusionPipeline", 512),
        "ssd-1b": ("segmind/SSD-1B", "StableDiffusionXLPipeline", 1024),
        "sdxl-base": ("stabilityai/stable-diffusion-xl-base-1.0", "StableDiffusionXLPipeline", 1024),
    }
    assert all(e.default_steps == 30 and e.default_guidance == 7.5 for e in catalog.values())


def test_operator_overrides_and_adds_models_from_environment(monkeypatch):
    monkeypatch.setenv("IMAGINE_MODELS", '{"sd-v1-4": {"source": "/weights/sd14"},'
                       ' "mine": {"source": "/weights/mine", "pipeline": "StableDiffusionXLPipeline",'
                       ' "native_size": 768}}')
    catalog = Settings().catalog()
    assert catalog["sd-v1-4"].source == "/weights/sd14"
    assert catalog["sd-v1-4"].pipeline == "StableDiffusionPipeline"  # the rest is kept
    assert catalog["mine"].native_size == 768


def test_a_bad_override_is_refused():
    with pytest.raises(ValueError):
        build_catalog({"new": {"source": "x"}})  # no pipeline class given


def test_secrets_stay_out_of_reprs(monkeypatch):
    monkeypatch.setenv("IMAGINE_DISCORD_TOKEN", "very-secret-token")
    assert "very-secret-token" not in repr(Settings())
    request = JobRequest.model_validate({
        "job_id": "x", "model": "m", "prompt": "p", "steps": 1, "guidance": 1, "seed": 1, "size": 64,
        "delivery": {"application_id": 1, "interaction_id": 2, "interaction_token": "tok-secret",
                     "user_id": 3}})
    assert "tok-secret" not in repr(request)


def request_for(**options) -> JobRequest:
    settings = Settings(_env_file=None)
    return build_request(ImagineOptions(**options), job_id="j", settings=settings, catalog=settings.catalog())


def test_defaults_come_from_the_model_and_settings():
    request = request_for(prompt="  an   orange cat ", model="SSD-1B")
    assert request.prompt == "an orange cat"
    assert (request.model, request.steps, request.guidance, request.width, request.height) == ("ssd-1b", 30, 7.5,
                                                                                          1024, 1024)
    assert request.negative_prompt.startswith("ugly, poorly rendered face")
    assert 0 <= request.seed < 2**32


def test_user_options_win_and_seeds_count_up():
    request = request_for(prompt="cat", negative_prompt="dogs", steps=10, guidance=3.0, seed=9,
                          size=512, count=3)
    assert request.negative_prompt == "dogs" and request.seeds() == [9, 10, 11]


def test_resolution_records_what_the_user_set_and_layers_the_defaults():
    settings = Settings(_env_file=None, default_model="bk-sdm-small")
    resolved = resolve_options(ImagineOptions(prompt=" a  cat ", steps=12), settings, settings.catalog(),
                               Defaults(model="ssd-1b", negative_prompt="lowres"))
    assert (resolved.prompt, resolved.entry.key, resolved.steps, resolved.width, resolved.height) == (
        "a cat", "ssd-1b", 12, 1024, 1024)
    assert resolved.negative_or_default == "lowres"
    assert "steps" in resolved.explicit and "size" not in resolved.explicit


@pytest.mark.parametrize("options, message", [
    ({"prompt": ""}, "empty"),
    ({"prompt": "a" * 501}, "limit is 500"),
    ({"prompt": "a", "negative_prompt": "b" * 501}, "`negative_prompt` is 501"),
    ({"prompt": "a", "steps": 0}, "`steps`"),
    ({"prompt": "a", "guidance": 21.0}, "`guidance`"),
    ({"prompt": "a", "count": 0}, "`count`"),
    ({"prompt": "a", "size": 4096}, "`size` must be between 256 and 2048"),
    ({"prompt": "a", "size": 2048}, "`size` of 2048×2048 is 4.19 MP; the limit is 1.05 MP"),
    ({"prompt": "a", "width": 1280, "height": 256}, "too elongated"),
    ({"prompt": "a", "aspect": "5:1"}, "too extreme"),
    ({"prompt": "a", "aspect": "wide"}, "must look like 16:9"),
    ({"prompt": "a", "strength": 0.5}, "`strength` applies only with an image"),
    ({"prompt": "a", "aspect": "16:9", "size": 512}, "Give `aspect` or `size`, not both"),
    ({"prompt": "a", "size": 520}, "multiple of 64"),
    ({"prompt": "a", "seed": -1}, "`seed`"),
    ({"prompt": "a", "model": "nope"}, "Unknown model"),
])
def test_invalid_options_explain_themselves(options, message):
    with pytest.raises(InvalidRequest, match=message.replace("`", "`")):
        request_for(**options)


def test_job_ids_and_queues_are_stable():
    assert job_id_for_interaction(123) == job_id_for_interaction(123) == "ix-123"
    assert queue_name("ssd-1b") == "imagine:ssd-1b"


