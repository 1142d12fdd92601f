"""Model wrappers: each loads one model of a profile and runs it (SDXL, the judge, CLIP, the LLM, OmniGen, DINO)."""
