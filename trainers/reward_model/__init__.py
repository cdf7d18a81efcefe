"""Bradley-Terry reward-model training (`rl train-rm`): the objective, the preference data and the model.

The run itself (checkpoints, metrics, resume, export) is rl/loop/rm_training.py, which wires these pieces
with the platform's checkpoint and logging modules. Texts, encoding and scores are rl.reward_model's, the same
the `reward_model` reward uses, so a trained model's reward equals its score here.
"""
