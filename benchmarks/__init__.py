"""fliqs_keras's benchmarks: one command each, results (JSON, PNG, Markdown) in benchmarks/results/."""
