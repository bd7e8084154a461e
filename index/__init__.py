"""Vector indexes (FAISS, Milvus) and retrieval evaluation. Depends on nothing else of ours."""
