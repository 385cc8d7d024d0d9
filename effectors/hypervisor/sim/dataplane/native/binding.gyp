{
  "targets": [
    {
      "target_name": "crc32_isal",
      "sources": ["crc32-isal.c"],
      "libraries": ["-lisal"],
      "cflags": ["-O2"]
    }
  ]
}
