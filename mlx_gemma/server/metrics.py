"""`GET /metrics` in the Prometheus text format (prometheus_client), one registry per server."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("mlx_gemma_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("mlx_gemma_prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.cached_tokens = Counter("mlx_gemma_cached_tokens", "prompt tokens the prefix cache served",
                                     registry=r)
        self.generated_tokens = Counter("mlx_gemma_generated_tokens", "tokens generated", registry=r)
        self.prefix_hits = Counter("mlx_gemma_prefix_cache_hits", "requests that reused a prefix-cache entry",
                                   registry=r)
        self.ttft = Histogram("mlx_gemma_time_to_first_token_seconds", "from admission to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.token_latency = Histogram("mlx_gemma_token_latency_seconds", "between two tokens of one sequence",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.batch = Histogram("mlx_gemma_batch_size", "sequences decoded per step", buckets=BATCH_BUCKETS,
                               registry=r)
        self.drafts_proposed = Counter("mlx_gemma_drafts_proposed", "MTP drafts verified", registry=r)
        self.drafts_accepted = Counter("mlx_gemma_drafts_accepted", "MTP drafts accepted", registry=r)
        self.step_failures = Counter("mlx_gemma_step_failures", "decode steps that failed (their requests "
                                                                "answered 5xx)", registry=r)
        self.running = Gauge("mlx_gemma_running_sequences", "sequences being generated", registry=r)
        self.waiting = Gauge("mlx_gemma_waiting_requests", "requests waiting for admission", registry=r)
        self.prefix_bytes = Gauge("mlx_gemma_prefix_cache_bytes", "bytes the prefix cache holds", registry=r)
        self.planned_bytes = Gauge("mlx_gemma_planned_memory_bytes", "the memory plan of what runs now: weights, "
                                   "peak activations, the running sequences' KV at their planned lengths, the "
                                   "prefix cache", registry=r)
        self.budget_bytes = Gauge("mlx_gemma_memory_budget_bytes", "the memory budget", registry=r)
        self.peak_bytes = Gauge("mlx_gemma_peak_memory_bytes", "MLX's peak memory since the start", registry=r)

    def text(self) -> bytes:
        return generate_latest(self.registry)
