"""Write a tiny LLaMA or Qwen2 GGUF (float32 tensors, llama.cpp names; LLaMA's q/k in llama.cpp's row order,
Qwen2's as they are, with its q/k/v biases) from a HF model."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (interleaved rotary halves), which GGUF readers undo."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model, tokenizer, path: Path, drop: tuple[str, ...] = (), hparams: bool = True,
                     block_count: int | None = None, embedding_length: int | None = None,
                     with_tokenizer: bool = True) -> Path:
    """``block_count`` / ``embedding_length`` override the header (a file whose metadata disagrees with its
    tensors); ``with_tokenizer=False`` leaves the tokenizer out. The architecture is the model's (llama or
    qwen2)."""
    import gguf

    cfg = model.config
    arch = cfg.model_type
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    if hparams:
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size if embedding_length is None else embedding_length)
        w.add_block_count(cfg.num_hidden_layers if block_count is None else block_count)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if with_tokenizer:
        vocab = tokenizer.get_vocab()
        tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
        w.add_tokenizer_model("gpt2")
        w.add_token_list(tokens)
        w.add_token_types([1] * len(tokens))
        merges = tokenizer.backend_tokenizer.to_str()
        import json

        m = json.loads(merges)["model"]["merges"]
        w.add_token_merges([" ".join(x) if isinstance(x, list) else x for x in m])
        w.add_bos_token_id(cfg.bos_token_id)
        w.add_eos_token_id(cfg.eos_token_id)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
                 "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
                 "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
                 "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
                 "mlp.down_proj.weight": "ffn_down.weight", "self_attn.q_proj.bias": "attn_q.bias",
                 "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias"}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in per_layer.items():
            names[f"model.layers.{i}.{hf}"] = f"blk.{i}.{gg}"
    for key, arr in sd.items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # a tied model's GGUF has no output.weight
        if arch == "llama" and key.endswith("q_proj.weight"):
            arr = _permute(arr, cfg.num_attention_heads)
        elif arch == "llama" and key.endswith("k_proj.weight"):
            arr = _permute(arr, cfg.num_key_value_heads)
        if names[key] not in drop:
            w.add_tensor(names[key], np.ascontiguousarray(arr, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
