"""scratchpad: teach language models to think before they answer, by RL from verifiers."""
