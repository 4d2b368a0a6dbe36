"""Side-by-side benchmarks that write reports under benchmarks/reports/."""
