"""Wire schema of the `fal-ai/wan-22` endpoint, exactly as its public documentation describes it.

Every field, range, default and enum here is the contract with clients written against the hosted
service. Where the public docs are silent (the ranges of `num_inference_steps`, the guidance scales
and `seed`) the bounds below are ours and are documented in docs and `/openapi.json`.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

DEFAULT_NEGATIVE_PROMPT = (
    "bright colors, overexposed, static, blurred details, subtitles, style, artwork, painting, picture, "
    "still, overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra "
    "fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, malformed limbs, fused fingers, "
    "still picture, cluttered background, three legs, many people in the background, walking backwards"
)

MIN_FRAMES, MAX_FRAMES = 81, 121
MIN_FPS, MAX_FPS = 4, 24
MIN_SHIFT, MAX_SHIFT = 1.0, 10.0
# Not documented by the hosted endpoint: generous bounds that keep one request within reason.
MIN_STEPS, MAX_STEPS = 1, 100
MIN_GUIDANCE, MAX_GUIDANCE = 0.0, 20.0
MIN_SEED, MAX_SEED = -(2**63), 2**63 - 1  # a 64-bit signed integer, which every store and client keeps exactly


def _unicode_text(value: str) -> str:
    """JSON admits lone UTF-16 surrogates (`"\\udfff"`); they are not text and cannot be stored or echoed."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (it contains a lone surrogate)") from None
    return value


Text = Annotated[str, AfterValidator(_unicode_text)]


def _plain_number(kind: str, noun: str) -> BeforeValidator:
    """pydantic's lax mode reads `true` as 1 and "8_1" as 81: a mistaken input would run (1 step, seed 1) instead
    of being refused. A number, or a number's plain text (GET submits send text), is what it takes."""

    def check(value: object) -> object:
        if isinstance(value, bool) or (isinstance(value, str) and "_" in value):
            raise PydanticCustomError(f"{kind}_type", f"Input should be a valid {noun}")
        return value

    return BeforeValidator(check)


Integer = Annotated[int, _plain_number("int", "integer")]
Number = Annotated[float, _plain_number("float", "number")]


class Resolution(StrEnum):
    P480 = "480p"
    P580 = "580p"
    P720 = "720p"


class AspectRatio(StrEnum):
    LANDSCAPE = "16:9"
    PORTRAIT = "9:16"
    SQUARE = "1:1"


# (width, height) of each resolution x aspect ratio: DESIGN.md section 3.
FRAME_SIZES: dict[tuple[Resolution, AspectRatio], tuple[int, int]] = {
    (Resolution.P480, AspectRatio.LANDSCAPE): (832, 480),
    (Resolution.P480, AspectRatio.PORTRAIT): (480, 832),
    (Resolution.P480, AspectRatio.SQUARE): (640, 640),
    (Resolution.P580, AspectRatio.LANDSCAPE): (1024, 576),
    (Resolution.P580, AspectRatio.PORTRAIT): (576, 1024),
    (Resolution.P580, AspectRatio.SQUARE): (768, 768),
    (Resolution.P720, AspectRatio.LANDSCAPE): (1280, 720),
    (Resolution.P720, AspectRatio.PORTRAIT): (720, 1280),
    (Resolution.P720, AspectRatio.SQUARE): (960, 960),
}

# The VAE compresses time 4x with a causal first frame: the model makes 4k+1 frames.
MODEL_FRAME_STEP = 4


def frame_size(resolution: Resolution | str, aspect_ratio: AspectRatio | str) -> tuple[int, int]:
    """(width, height) in pixels for a resolution and aspect ratio."""
    return FRAME_SIZES[(Resolution(resolution), AspectRatio(aspect_ratio))]


def frames_to_generate(num_frames: int, frame_step: int = MODEL_FRAME_STEP) -> int:
    """The smallest valid model frame count (frame_step*k + 1) that is >= num_frames.

    The video returned is then cut back to exactly num_frames.
    """
    if num_frames < 1:
        raise ValueError("num_frames must be positive")
    k = -(-(num_frames - 1) // frame_step)  # ceil division
    return frame_step * k + 1


class WanT2VRequest(BaseModel):
    """Input of `fal-ai/wan-22` (text to video)."""

    # Unknown fields are ignored, as the hosted service does; the API names them in a warning log line.
    model_config = ConfigDict(extra="ignore", use_enum_values=False)

    prompt: Text = Field(..., min_length=1, description="The text prompt to guide video generation.")
    negative_prompt: Text = Field(DEFAULT_NEGATIVE_PROMPT, description="Negative prompt for video generation.")
    num_frames: Integer = Field(
        81,
        ge=MIN_FRAMES,
        le=MAX_FRAMES,
        description="Number of frames to generate. Must be between 81 to 121 (inclusive).",
    )
    frames_per_second: Integer = Field(
        16,
        ge=MIN_FPS,
        le=MAX_FPS,
        description="Frames per second of the generated video. Must be between 4 to 24.",
    )
    # The bounds on the integer itself: on the optional field they would reach the JSON schema as "ge"/"le".
    # A negative seed is drawn at random, as Wan's reference code reads its default of -1 (and many UIs send it):
    # the hosted schema sets no bound, so such a client must not get a 422 here.
    seed: Annotated[
        Annotated[int, Field(ge=MIN_SEED, le=MAX_SEED), _plain_number("int", "integer")] | None,
        AfterValidator(lambda seed: None if seed is not None and seed < 0 else seed),
    ] = Field(
        None,
        description="Random seed for reproducibility. If None, a random seed is chosen. (Here a negative seed, "
        "such as -1, is chosen at random too; the seed used is returned.)",
    )
    resolution: Resolution = Field(
        Resolution.P720, description="Resolution of the generated video (480p, 580p, or 720p)."
    )
    aspect_ratio: AspectRatio = Field(
        AspectRatio.LANDSCAPE, description="Aspect ratio of the generated video (16:9 or 9:16)."
    )
    num_inference_steps: Integer = Field(
        30,
        ge=MIN_STEPS,
        le=MAX_STEPS,
        description="Number of inference steps for sampling. Higher values give better quality but take longer.",
    )
    enable_safety_checker: bool = Field(
        True, description="If set to true, input data will be checked for safety before processing."
    )
    enable_prompt_expansion: bool = Field(
        False,
        description="Whether to enable prompt expansion. This will use a large language model to expand the "
        "prompt with additional details while maintaining the original meaning.",
    )
    guidance_scale: Number = Field(
        5.0,
        allow_inf_nan=False,
        ge=MIN_GUIDANCE,
        le=MAX_GUIDANCE,
        description="Classifier-free guidance scale. Higher values give better adherence to the prompt but may "
        "decrease quality.",
    )
    guidance_scale_2: Number = Field(
        4.0,
        allow_inf_nan=False,
        ge=MIN_GUIDANCE,
        le=MAX_GUIDANCE,
        description="Guidance scale for the second stage of the model. This is used to control the adherence to "
        "the prompt in the second stage of the model.",
    )
    shift: Number = Field(
        5.0,
        allow_inf_nan=False,
        ge=MIN_SHIFT,
        le=MAX_SHIFT,
        description="Shift value for the video. Must be between 1.0 and 10.0.",
    )

    @property
    def frame_size(self) -> tuple[int, int]:
        return frame_size(self.resolution, self.aspect_ratio)


class LoRAWeight(BaseModel):
    """One LoRA to apply for a request."""

    model_config = ConfigDict(extra="ignore")

    path: Text = Field(..., min_length=1, description="URL or the path to the LoRA weights.")
    weight_name: Text | None = Field(
        None,
        description="Name of the LoRA weight. Used only if path is a Hugging Face repository, and required only "
        "if you have more than 1 safetensors file in the repo.",
    )
    scale: Number = Field(
        1.0,
        allow_inf_nan=False,  # a NaN or infinite scale can only make a broken video
        description="The scale of the LoRA weight. This is used to scale the LoRA weight before merging it with "
        "the base model.",
    )
    # Our extension (not in the hosted schema): which expert the LoRA applies to.
    transformer: Literal["high", "low", "both"] = Field(
        "both",
        description="wanserve extension: apply the LoRA to the high-noise expert, the low-noise one, or both.",
    )


class WanLoRAT2VRequest(WanT2VRequest):
    """Input of `fal-ai/wan-22/lora`: the text-to-video input plus LoRAs and reversal."""

    loras: list[LoRAWeight] = Field(default_factory=list, description="LoRA weights to be used in the inference.")
    reverse_video: bool = Field(False, description="If true, the video will be reversed.")


class File(BaseModel):
    url: str = Field(..., description="The URL where the file can be downloaded from.")
    content_type: str | None = Field(None, description="The mime type of the file.")
    file_name: str | None = Field(None, description="The name of the file. It will be auto-generated if not provided.")
    file_size: int | None = Field(None, description="The size of the file in bytes.")
    file_data: str | None = Field(None, description="File data")


class WanT2VResponse(BaseModel):
    video: File = Field(..., description="The generated video file.")
    seed: int = Field(..., description="The seed used for generation.")
    # The prompt actually used (after expansion, when enabled).
    prompt: str | None = Field(None, description="The prompt used for generation.")


def unknown_fields(model: type[BaseModel], data: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The names in `data` that `model` ignores (it takes unknown fields, as the hosted service does), nested ones
    included, as `loras.0.strength`: a misspelt LoRA `scale` would otherwise apply the LoRA at 1 without a word."""
    names = [f"{prefix}{key}" for key in data if key not in model.model_fields]
    for name, field in model.model_fields.items():
        inner = _model_of(field.annotation)
        value = data.get(name)
        if inner is None:
            continue
        if isinstance(value, dict):
            names += unknown_fields(inner, value, f"{prefix}{name}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    names += unknown_fields(inner, item, f"{prefix}{name}.{i}.")
    return names


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds, alone or as a list's items."""
    if get_origin(annotation) is list:
        (annotation,) = get_args(annotation) or (None,)
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
