"""Method experiments: a method from a paper against its baseline (GRPO-MA, Lp-Reg, PCL, RAPID, SAPO)."""
