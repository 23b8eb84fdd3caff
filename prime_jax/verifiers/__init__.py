"""Host-side outcome verifiers: math (`math`), code run in a sandbox (`code`; `sandbox` with `protocol`, `bwrap`,
`zygote` on the host and `harness` inside), the process pool that runs them (`pool`), and the streaming verifier
that scores a sampler call's rows while it decodes (`streaming`)."""
