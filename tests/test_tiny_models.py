"""hero.testing.tiny_models: tiny random-init transformers models written offline and loaded back."""
import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("PIL")

from hero.testing.tiny_models import load_processor, main  # noqa: E402


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava", "llava_next"])
def test_vlm_roundtrip_generates(tmp_path, family):
    from transformers import AutoModelForImageTextToText

    out = str(tmp_path / family)
    assert main(["--family", family, "--out", out]) == 0
    model = AutoModelForImageTextToText.from_pretrained(out)
    proc = load_processor(out)  # AutoProcessor, or the image-only fallback without torchvision
    assert type(proc).__name__ == {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor", "llava": "LlavaProcessor",
                                   "llava_next": "LlavaNextProcessor"}[family]
    msgs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a 7?"}]}]] * 2
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    img = np.random.default_rng(0).integers(0, 255, (32, 96, 3), dtype=np.uint8)
    enc = proc(images=[img, img], text=text, return_tensors="pt", padding=True, padding_side="left")
    seq = model.generate(**enc, do_sample=True, max_new_tokens=3, min_new_tokens=3)
    assert seq.shape == (2, enc["input_ids"].shape[1] + 3)
    # the fallback processor saves and loads back as the real class
    proc.save_pretrained(str(tmp_path / "again"))
    assert type(load_processor(str(tmp_path / "again"))).__name__ == type(proc).__name__


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_text_families_and_bad_family(tmp_path, family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = str(tmp_path / family)
    main(["--family", family, "--out", out])
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.decode(tok("héllo wörld")["input_ids"]) == "héllo wörld"  # byte-level: any text round-trips
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size >= len(tok) and model.config.model_type == family
    with pytest.raises(SystemExit):
        main(["--family", "gpt5", "--out", out])
