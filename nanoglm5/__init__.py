"""nanoGLM5: the GLM-5 recipe (data, MLA+DSA+MoE+MTP model, pretraining, async RL, INT4, serving) at tiny scale."""
