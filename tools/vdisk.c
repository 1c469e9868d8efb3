#include <stdio.h>
int vd_bench_main(int argc, char **argv);
int main(int argc, char **argv) { return argc > 1 ? vd_bench_main(argc - 1, argv + 1) : 2; }
