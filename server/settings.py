"""Server settings: one dataclass, a help text per field (also `stepzip serve --help`).

Built with the project's one configuration mechanism (`stepzip.config`): flags of the same
name, then `STEPZIP_<FIELD>` environment variables, then the defaults here. So
`create_app(ServerSettings())` behaves as `stepzip serve` with no flags does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from stepzip.config import option, unescape
from stepzip.constants import LINE_DELIMITER, PARAGRAPH_DELIMITER


@dataclass
class ServerSettings:
    env_prefix: ClassVar[str] = "STEPZIP_"

    model: str = option(
        "default",
        "Hugging Face id or local folder; `default` = the embedded SmolLM2-135M-Instruct.")
    served_model_name: str | None = option(
        None,
        "Name reported by /v1/models and accepted in requests; None = derived from the "
        "model.")
    dtype: str = option(
        "auto",
        "Model dtype for vLLM; `auto` = the model's own on GPU, and on the CPU bfloat16 "
        "only where the CPU has native bf16 (AVX512-BF16/AMX), else float32 (measured 4x "
        "faster on an AVX2-only CPU). Entropy is always computed in float32.")
    max_model_len: int = option(
        2048,
        "Longest prompt + completion the engine accepts.")
    max_num_seqs: int = option(
        64,
        "Requests the engine batches at once.")
    tensor_parallel_size: int = option(
        1,
        "Tensor-parallel workers (GPU).")
    data_parallel_size: int = option(
        1,
        "Data-parallel engine replicas inside this server (vLLM balances requests over "
        "them; on the CPU set VLLM_CPU_OMP_THREADS_BIND to one core list per replica, "
        "'0|1').")
    pipeline_parallel_size: int = option(
        1,
        "Pipeline-parallel stages (GPU).")
    distributed_executor_backend: Literal["mp", "ray", "uni"] | None = option(
        None,
        "vLLM's executor for parallel workers: mp (processes), ray (multi-node; needs "
        "ray installed), uni; None = vLLM's choice.")
    enforce_eager: bool = option(
        True,
        "Skip torch.compile / CUDA graphs: CPU start-up ~25 s instead of ~115 s.")
    kv_cache_gib: float | None = option(
        None,
        "KV-cache size in GiB (CPU: default 2); None = vLLM's default on GPU.")
    gpu_memory_utilization: float = option(
        0.9,
        "Fraction of GPU memory vLLM may take (GPU only).")
    chunked_prefill: bool | None = option(
        None,
        "None = off on the CPU (vLLM's CPU sampler crashes on a seeded request whose "
        "prefill is chunked: it rewinds a CPU torch.Generator by offset, which CPU "
        "generators lack).")
    seed: int = option(
        0,
        "Engine seed.")
    pin_frontend: bool = option(
        True,
        "CPU serving: pin the API and engine-core processes to the cores vLLM's workers "
        "are not bound to, so HTTP, detokenizing and stepzip's own work never take a "
        "model core (skipped when the workers use every core). No effect on GPU.")
    entropy: bool = option(
        True,
        "Load the entropy logits processor (off only to measure its cost).")
    max_problems: int = option(
        64,
        "Most problems one /v1/compress request may carry.")
    max_n: int = option(
        64,
        "Most samples per prompt (n).")
    step_delimiter: str | None = option(
        None,
        "Default step delimiter, escapes allowed ('\\n'); None = the paper's blank line, "
        "except on the embedded default model, which rarely leaves blank lines and gets "
        "a single newline.")
    host: str = option(
        "127.0.0.1",
        "Bind address.")
    port: int = option(
        8000,
        "Bind port.")
    api_key: str | None = option(
        None,
        "When set, every route but /health needs `Authorization: Bearer <key>`.")
    enable_weight_routes: bool = option(
        False,
        "Expose weight loading / transfer routes.")
    weights_root: str | None = option(
        None,
        "Checkpoint folders for /v1/weights/load must lie under this folder.")
    max_pending_requests: int = option(
        1024,
        "Engine requests admitted at once (running + queued; a request with n samples and "
        "answer variants counts each); past it requests get 429 with Retry-After at once "
        "instead of queueing without bound.")
    grading_timeout: float = option(
        5.0,
        "Seconds one grading call (answer extraction, or comparing an answer with the "
        "gold) may take. Grading runs in child processes; one that runs past this is "
        "stopped and the answer is reported `ungradable` (math-verify can run without end "
        "on a short string such as 9^{9^{9}}).")
    grading_workers: int = option(
        2,
        "Grading child processes: answers graded at once.")
    max_body_bytes: int = option(
        8 * 2**20,
        "Largest request body; larger ones get 413 before any of it is parsed.")
    logprobs_mode: Literal["processed_logprobs", "raw_logprobs", "processed_logits",
                           "raw_logits"] = option(
        "processed_logprobs",
        "What `logprobs` report (vLLM's --logprobs-mode): `processed_logprobs` = after "
        "temperature, penalties and top-k/top-p, as TRL 1.16's own `vllm_serve` starts vLLM "
        "(the trainer's importance sampling expects these); `raw_logprobs` = vLLM's default.")
    max_logprobs: int = option(
        20,
        "Most logprobs per token a request may ask for (vLLM's --max-logprobs; -1 = the "
        "vocabulary, as TRL's `vllm_serve` sets it).")
    reasoning_parser: str | None = option(
        None,
        "vLLM reasoning parser (e.g. deepseek_r1, qwen3): chat responses then carry the "
        "reasoning in `message.reasoning`, as `vllm serve --reasoning-parser` returns it.")
    trust_request_chat_template: bool = option(
        False,
        "Accept `chat_template` in chat requests (vLLM's --trust-request-chat-template); "
        "off, such requests get 400: a template is code run on the server.")
    extra_engine_args: dict = option(
        default_factory=dict, flag=False,
        help="Passed through to vLLM's AsyncEngineArgs (`--engine-arg KEY=JSON`).")

    def __post_init__(self) -> None:
        if self.step_delimiter is None:
            default_model = self.model in ("default", "")
            self.step_delimiter = LINE_DELIMITER if default_model else PARAGRAPH_DELIMITER
        self.step_delimiter = unescape(self.step_delimiter)

