"""Semantic side of retrieval: item text -> embeddings (the ground SRA-CL and GRASP build on)."""
