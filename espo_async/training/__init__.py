"""The learner's machinery and nobody else's: the PPO trainer, batching, the data-parallel ranks
and the T-PPO windows."""
