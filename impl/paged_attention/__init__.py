"""Project 13: paged attention. A block allocator (``allocator``), a KV cache whose sequences live in
fixed-size blocks of one shared pool (``fast.PagedKVCache``), and paged attention three ways: a
gather-based reference (``naive``), vectorized torch (``fast``) and a Triton kernel (``triton_kernel``)."""
