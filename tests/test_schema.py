from __future__ import annotations

import pytest
from pydantic import ValidationError

from wanserve.schema import (
    DEFAULT_NEGATIVE_PROMPT,
    AspectRatio,
    LoRAWeight,
    Resolution,
    WanLoRAT2VRequest,
    WanT2VRequest,
    WanT2VResponse,
    frame_size,
    frames_to_generate,
    unknown_fields,
)


def error_fields(exc: ValidationError) -> set[str]:
    return {".".join(str(p) for p in e["loc"]) for e in exc.errors()}


def test_documented_defaults() -> None:
    r = WanT2VRequest(prompt="a cat")
    assert r.negative_prompt == DEFAULT_NEGATIVE_PROMPT
    assert DEFAULT_NEGATIVE_PROMPT.startswith("bright colors, overexposed, static")
    assert DEFAULT_NEGATIVE_PROMPT.endswith("many people in the background, walking backwards")
    assert r.num_frames == 81
    assert r.frames_per_second == 16
    assert r.seed is None
    assert r.resolution is Resolution.P720
    assert r.aspect_ratio is AspectRatio.LANDSCAPE
    assert r.num_inference_steps == 30
    assert r.enable_safety_checker is True
    assert r.enable_prompt_expansion is False
    assert r.guidance_scale == 5
    assert r.guidance_scale_2 == 4
    assert r.shift == 5


def test_lora_request_defaults() -> None:
    r = WanLoRAT2VRequest(prompt="a cat", loras=[{"path": "https://x/y.safetensors"}])
    assert r.reverse_video is False
    assert r.loras[0].scale == 1
    assert r.loras[0].weight_name is None
    assert r.loras[0].transformer == "both"
    assert WanLoRAT2VRequest(prompt="a").loras == []
    with pytest.raises(ValidationError) as exc:
        WanLoRAT2VRequest(prompt="a", loras=[{"scale": 1}])
    assert "loras.0.path" in error_fields(exc.value)
    with pytest.raises(ValidationError) as exc:
        LoRAWeight(path="x", transformer="middle")  # type: ignore[arg-type]
    assert "transformer" in error_fields(exc.value)
    assert LoRAWeight(path="x", scale=-0.5).scale == -0.5  # negative scales are legitimate (subtract a style)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValidationError) as exc:
            WanLoRAT2VRequest(prompt="a", loras=[{"path": "x", "scale": bad}])
        assert "loras.0.scale" in error_fields(exc.value)


def test_prompt_is_required() -> None:
    with pytest.raises(ValidationError) as exc:
        WanT2VRequest.model_validate({})
    assert error_fields(exc.value) == {"prompt"}
    with pytest.raises(ValidationError):
        WanT2VRequest(prompt="")


@pytest.mark.parametrize(
    ("field", "inside", "outside"),
    [
        ("num_frames", [81, 100, 121], [80, 122]),
        ("frames_per_second", [4, 24], [3, 25]),
        ("shift", [1.0, 10.0, 5.5], [0.99, 10.01]),
        ("num_inference_steps", [1, 100], [0, 101]),
        ("guidance_scale", [0.0, 20.0], [-0.1, 20.1]),
        ("guidance_scale_2", [0.0, 20.0], [-0.1, 20.1]),
        ("seed", [0, 2**63 - 1], [-(2**63) - 1, 2**63]),
    ],
)
def test_range_edges(field: str, inside: list[float], outside: list[float]) -> None:
    for value in inside:
        assert getattr(WanT2VRequest(prompt="p", **{field: value}), field) == value
    for value in outside:
        with pytest.raises(ValidationError) as exc:
            WanT2VRequest(prompt="p", **{field: value})
        assert error_fields(exc.value) == {field}


@pytest.mark.parametrize(
    ("field", "bad"),
    [("num_frames", "many"), ("num_frames", 81.5), ("shift", "high"), ("enable_safety_checker", "perhaps")],
)
def test_wrong_types_name_the_field(field: str, bad: object) -> None:
    with pytest.raises(ValidationError) as exc:
        WanT2VRequest(prompt="p", **{field: bad})
    assert error_fields(exc.value) == {field}


NUMBERS = [
    "num_frames",
    "frames_per_second",
    "seed",
    "num_inference_steps",
    "guidance_scale",
    "guidance_scale_2",
    "shift",
]


@pytest.mark.parametrize("field", NUMBERS)
def test_a_boolean_or_underscored_text_is_not_a_number(field: str) -> None:
    """Lax pydantic read `true` as 1: all five set to true ran 1 step at seed 1, shift 1, no guidance."""
    for bad in (True, False, "8_1"):
        with pytest.raises(ValidationError) as exc:
            WanLoRAT2VRequest.model_validate({"prompt": "p", field: bad})
        assert error_fields(exc.value) == {field}
        assert exc.value.errors()[0]["type"] in ("int_type", "float_type")
    for bad in (True, "1_0"):
        with pytest.raises(ValidationError) as exc:
            LoRAWeight.model_validate({"path": "a/b", "scale": bad})
        assert error_fields(exc.value) == {"scale"}
    # Numbers and their plain text (a GET submit's query values) are read as before.
    assert WanT2VRequest.model_validate({"prompt": "p", "num_frames": "90", "shift": "2.5"}).num_frames == 90
    assert WanT2VRequest.model_validate({"prompt": "p", "guidance_scale": 3}).guidance_scale == 3.0


@pytest.mark.parametrize("field", ["guidance_scale", "guidance_scale_2", "shift"])
def test_nan_and_infinity_are_refused_as_not_finite(field: str) -> None:
    for bad in (float("nan"), float("inf"), "nan", "-Infinity"):
        with pytest.raises(ValidationError) as exc:
            WanT2VRequest.model_validate({"prompt": "p", field: bad})
        assert [(e["loc"], e["type"]) for e in exc.value.errors()] == [((field,), "finite_number")]


def test_unknown_fields_are_named_nested_ones_too() -> None:
    body = {
        "prompt": "p",
        "lora": 1,
        "loras": [{"path": "a/b", "strength": 0.25}, {"path": "c/d", "scale": 2}, "x", {"path": "e", "weight": 1}],
    }
    assert unknown_fields(WanLoRAT2VRequest, body) == ["lora", "loras.0.strength", "loras.3.weight"]
    assert unknown_fields(WanT2VRequest, body) == ["lora", "loras"]  # no loras field on the base endpoint


def test_enums() -> None:
    assert [r.value for r in Resolution] == ["480p", "580p", "720p"]
    assert [a.value for a in AspectRatio] == ["16:9", "9:16", "1:1"]
    for bad in ("1080p", "480"):
        with pytest.raises(ValidationError) as exc:
            WanT2VRequest(prompt="p", resolution=bad)
        assert error_fields(exc.value) == {"resolution"}
    with pytest.raises(ValidationError) as exc:
        WanT2VRequest(prompt="p", aspect_ratio="4:3")
    assert error_fields(exc.value) == {"aspect_ratio"}


def test_resolution_table_all_nine() -> None:
    expected = {
        ("480p", "16:9"): (832, 480),
        ("480p", "9:16"): (480, 832),
        ("480p", "1:1"): (640, 640),
        ("580p", "16:9"): (1024, 576),
        ("580p", "9:16"): (576, 1024),
        ("580p", "1:1"): (768, 768),
        ("720p", "16:9"): (1280, 720),
        ("720p", "9:16"): (720, 1280),
        ("720p", "1:1"): (960, 960),
    }
    for (res, ar), size in expected.items():
        assert frame_size(res, ar) == size
        assert WanT2VRequest(prompt="p", resolution=res, aspect_ratio=ar).frame_size == size
        # Every size must fit the real model: VAE stride 8 x patch 2.
        assert size[0] % 16 == 0 and size[1] % 16 == 0


@pytest.mark.parametrize(
    ("asked", "generated"), [(81, 81), (82, 85), (84, 85), (85, 85), (86, 89), (100, 101), (121, 121), (1, 1)]
)
def test_frame_rule(asked: int, generated: int) -> None:
    assert frames_to_generate(asked) == generated
    assert (generated - 1) % 4 == 0 and generated >= asked


def test_unknown_fields_are_ignored() -> None:
    r = WanT2VRequest.model_validate({"prompt": "p", "not_a_field": 3})
    assert not hasattr(r, "not_a_field")


def test_output_shape() -> None:
    out = WanT2VResponse.model_validate(
        {"video": {"url": "http://x/v.mp4", "content_type": "video/mp4", "file_size": 3}, "seed": 7}
    )
    assert out.video.url == "http://x/v.mp4" and out.seed == 7
    with pytest.raises(ValidationError) as exc:
        WanT2VResponse.model_validate({"video": {"url": "u"}})
    assert error_fields(exc.value) == {"seed"}


def test_lone_surrogates_are_not_text() -> None:
    import pydantic

    from wanserve.schema import WanLoRAT2VRequest as LoRARequest

    for body in ({"prompt": "a \ud800 fox"}, {"prompt": "x", "negative_prompt": "\udfff"},
                 {"prompt": "x", "loras": [{"path": "https://x/\ud800.safetensors"}]}):  # fmt: skip
        with pytest.raises(pydantic.ValidationError, match=r"valid string|lone surrogate"):
            LoRARequest.model_validate(body)


@pytest.mark.parametrize("seed", [-1, -(2**63)])
def test_a_negative_seed_is_drawn_at_random_as_wan_reads_minus_one(seed: int) -> None:
    """The hosted schema bounds no seed, and Wan's reference code (and many UIs) send -1 for "random": a 422 would
    break such a client. It is read as no seed, so the seed drawn is the one returned."""
    assert WanT2VRequest(prompt="p", seed=seed).seed is None
    assert WanT2VRequest(prompt="p", seed=0).seed == 0
