"""Vision rows (`image` / `images`): read and checked, tokenized and scored as TRL 1.16 does, and a tiny
randomly initialised vision-language model (Llava: CLIP tower + Llama) trained end to end on Ray."""

import io
import json

import numpy as np
import pytest
import torch

from raydpo import DPOConfig, DPOTrainer
from raydpo.data.batching import PADDED, collate
from raydpo.data.formats import RowError, normalize
from raydpo.data.sources import json_row, raw_rows
from raydpo.data.tokenize import tokenize_pair
from raydpo.logprobs import model_completion_logps
from raydpo.tasks import colour_image as image
from raydpo.tasks import colour_pairs as colour_rows
from raydpo.model_loading import load_model


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    from raydpo.models import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("tiny_vlm"), ["what colour is this image ? it is red green blue"])


@pytest.fixture(scope="module")
def processor(tiny_vlm):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_vlm)


def test_image_fields_are_read_in_every_form(tmp_path):
    png = io.BytesIO()
    image("red").save(png, format="PNG")
    path = tmp_path / "red.png"
    path.write_bytes(png.getvalue())
    base = {"prompt": "<image> what", "chosen": " red", "rejected": " blue"}
    forms = [image("red"), np.asarray(image("red")), png.getvalue(), str(path), {"bytes": png.getvalue(), "path": None},
             {"bytes": None, "path": str(path)}]
    for value in forms:
        _, pair = normalize(dict(base, image=value))
        assert len(pair.images) == 1
        # the same row after the JSON round trip that in-memory rows take (images become base64)
        raw, _, error, _ = next(raw_rows(__import__("pyarrow").Table.from_pylist([json_row(dict(base, image=value))])))
        assert error is None and normalize(raw)[1].images == pair.images
    _, pair = normalize(dict(base, images=[image("red"), image("blue")]))
    assert len(pair.images) == 2
    assert normalize(base)[1].images is None  # a text row


@pytest.mark.parametrize("row, message", [
    ({"image": 3}, "field 'image' must be an image"),
    ({"images": image("red")}, "field 'images' must be a list of images"),
    ({"images": [image("red"), "missing.png"]}, "field 'images[1]' is a path to no file"),
    ({"image": b"not an image"}, "field 'image' is not a readable image"),
    ({"image": image("red"), "images": [image("red")]}, "fields 'image' and 'images' are both set"),
])
def test_bad_image_fields_name_the_field(row, message):
    with pytest.raises(RowError, match=message.replace("[", r"\[").replace("]", r"\]")):
        normalize({"prompt": "<image> what", "chosen": " red", "rejected": " blue", **row})


@pytest.mark.parametrize("conversational, token_types", [(True, False), (False, False), (True, True)])
def test_tokenization_and_pixel_values_match_trl(tiny_vlm, conversational, token_types):
    """The same rows through TRL 1.16's DataCollatorForVisionPreference and through raydpo's
    tokenize + collate: the same tokens per sequence, the same completion tokens, the same pixel values
    and, for a processor that returns them (as Qwen2.5-VL's does), the same mm_token_type_ids."""
    from transformers import AutoProcessor
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    processor = AutoProcessor.from_pretrained(tiny_vlm)
    processor.return_mm_token_type_ids = token_types
    rows = colour_rows(3, conversational)
    theirs = DataCollatorForVisionPreference(processor)([dict(row) for row in rows])
    tokenized = []
    for row in rows:
        pair = normalize(row)[1]
        tokenized.append({**tokenize_pair(processor, pair), "images": pair.images})
    assert all(bool(t["prompt_token_types"]) == token_types for t in tokenized)
    ours = collate(tokenized, processor.tokenizer.pad_token_id, None, share_prompt=True,
                   image_processor=processor.image_processor)
    assert ours.layout == PADDED and ours.gather_index is None  # rows with images are never packed into shared-prompt sequences
    for i in range(2 * len(rows)):
        keep = theirs["attention_mask"][i].bool()
        assert ours.input_ids[i][ours.attention_mask[i].bool()].tolist() == theirs["input_ids"][i][keep].tolist()
        assert ours.completion_mask[i][ours.attention_mask[i].bool()].tolist() == \
            theirs["completion_mask"][i][keep].tolist()
    assert torch.equal(ours.images["pixel_values"], theirs["pixel_values"])  # chosen's images, then rejected's
    assert ("mm_token_type_ids" in ours.images) == token_types == ("mm_token_type_ids" in theirs)
    if token_types:
        for i in range(2 * len(rows)):
            types = ours.images["mm_token_type_ids"][i][ours.attention_mask[i].bool()]
            assert types.tolist() == theirs["mm_token_type_ids"][i][theirs["attention_mask"][i].bool()].tolist()
            assert types.sum() == 16  # one per image token


def test_images_reach_the_forward_of_chosen_and_rejected(tiny_vlm, processor):
    rows = colour_rows(2)
    model = load_model(tiny_vlm, DPOConfig())

    def logps(rows):
        tokenized = [{**tokenize_pair(processor, normalize(r)[1]), "images": normalize(r)[1].images} for r in rows]
        with torch.no_grad():
            return model_completion_logps(model, collate(tokenized, processor.tokenizer.pad_token_id,
                                                         image_processor=processor.image_processor))

    before = logps(rows)
    other = "green" if rows[0]["chosen"][0]["content"] != "it is green" else "red"
    after = logps([dict(rows[0], images=[image(other)]), rows[1]])
    changed = ~torch.isclose(before, after, rtol=0, atol=1e-6)
    assert changed.tolist() == [True, False, True, False]  # row 0's chosen and rejected, not row 1's


def test_vision_rows_need_a_processor_and_an_image_token(ray_session, tiny_vlm, processor, tiny_model):
    from transformers import AutoTokenizer

    rows = colour_rows(4, conversational=False)
    with pytest.raises(ValueError, match="train_dataset row 0.*need a processor"):
        DPOTrainer(tiny_model, args=DPOConfig(max_length=64), train_dataset=rows,
                   processing_class=AutoTokenizer.from_pretrained(tiny_model))
    bad = rows[:2] + [dict(rows[2], prompt="what colour is this image ?")] + rows[3:]
    with pytest.raises(ValueError, match="train_dataset row 2.*field 'prompt' holds 0 image placeholder"):
        DPOTrainer(tiny_vlm, args=DPOConfig(max_length=64), train_dataset=bad)
    with pytest.raises(ValueError, match="truncation_mode='keep_end'"):
        DPOTrainer(tiny_vlm, args=DPOConfig(max_length=64, truncation_mode="keep_end"), train_dataset=rows)
    with pytest.raises(ValueError, match="not supported for rows with images"):
        DPOTrainer(tiny_vlm, args=DPOConfig(max_length=64, precompute_ref_log_probs=True), train_dataset=rows)


def test_vision_model_trains_end_to_end(ray_session, tiny_vlm, tmp_path):
    """2 workers (ZeRO-2), images on every row of the train split (a list of dicts) and the eval split (a
    `datasets.Dataset`): the vision tower gets
    gradients through chosen and rejected, and the export loads with plain transformers."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    args = DPOConfig(output_dir=str(tmp_path), num_workers=2, max_steps=3, logging_steps=1, save_steps=100,
                     per_device_train_batch_size=4, learning_rate=1e-2, max_length=64, eval_strategy="steps",
                     eval_steps=3, per_device_eval_batch_size=4)
    from datasets import Dataset

    eval_dataset = Dataset.from_list(colour_rows(8, seed=2))  # a `datasets` Image column: {"bytes", "path"} rows
    assert type(eval_dataset.features["images"]).__name__ == "List"
    trainer = DPOTrainer(tiny_vlm, args=args, train_dataset=colour_rows(24, seed=1), eval_dataset=eval_dataset)
    out = trainer.train()
    assert [row["global_step"] for row in out.history] == [1, 2, 3]
    assert all(np.isfinite(row["loss"]) for row in out.history) and "eval_loss" in out.history[-1]
    assert out.history[0]["loss"] == pytest.approx(np.log(2), abs=1e-6)  # the policy starts as its reference
    trainer.save_model(str(tmp_path / "export"))
    trained = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "export"))
    initial = AutoModelForImageTextToText.from_pretrained(tiny_vlm)
    tower = [name for name, _ in initial.named_parameters() if "vision_tower" in name]
    changed = [name for name in tower if not torch.equal(trained.state_dict()[name], initial.state_dict()[name])]
    assert tower and len(changed) > len(tower) // 2  # the pixel values reached the loss
    AutoProcessor.from_pretrained(str(tmp_path / "export"))  # the processor is saved with the model
    assert json.loads((tmp_path / "export" / "config.json").read_text())["model_type"] == "llava"
