"""Prometheus metrics (one registry per app, so tests can start several apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("stepzip_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("stepzip_request_seconds", "Request latency by route",
                                 ["route"], registry=self.registry,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.prompt_tokens = Counter("stepzip_prompt_tokens", "Prompt tokens processed",
                                     registry=self.registry)
        self.completion_tokens = Counter("stepzip_completion_tokens", "Tokens generated",
                                         registry=self.registry)
        self.reduction = Histogram("stepzip_compression_reduction",
                                   "Token reduction of compressed variants",
                                   ["strategy"], registry=self.registry,
                                   buckets=(0, .1, .2, .3, .4, .5, .6, .7, .8, .9, 1))
        self.entropy_fetch = Histogram("stepzip_entropy_fetch_seconds",
                                       "Time to fetch a batch of finished requests' entropies",
                                       registry=self.registry,
                                       buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .5))
        self.entropy_evictions = Counter(
            "stepzip_entropy_evictions",
            "Finished requests' entropies evicted unfetched from a full worker store "
            "(oldest first); a later fetch of one fails", registry=self.registry)

        self.grades = Counter(
            "stepzip_grades", "Answers graded, by outcome (correct, wrong, ungradable: past "
            "--grading-timeout or failed; no_gold)", ["outcome"], registry=self.registry)

    def observe_grade(self, grade) -> None:
        """One answer graded (stepzip.grader.Grade); called from grading threads."""
        self.grades.labels(grade.outcome).inc()

    def observe_compress(self, response) -> None:
        """Tokens and per-strategy reductions of one /v1/compress response."""
        usage = response.usage
        self.prompt_tokens.inc(usage.prompt_tokens)
        self.completion_tokens.inc(usage.completion_tokens + usage.answer_tokens)
        for problem in response.results:
            for trace in problem.traces:
                for v in trace.variants:
                    self.reduction.labels(v.strategy).observe(v.reduction)
