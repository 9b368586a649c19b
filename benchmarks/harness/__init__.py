"""What the benchmarks and the tests share: start a stock SGLang server and talk to it
(``server_process``), the main job's client workload (``server_workload``), random paged stores
for the kernel benchmarks (``random_store``), the server fuzzer (``server_fuzz``,
``fuzz_model``), SGLang's scheduler without a model (``sched_context``, ``sglang_sched``,
``workloads``, ``pools``, ``prefix_sharing_report``), the static kernel cost tools
(``static_compile``, ``sass``) and the JSON result header (``common``).

Every ``benchmarks/bench_*.py`` is a thin command-line script over these modules (and the
package). Tests import shared code from here; they touch a ``bench_*`` script only to check
that the script itself still runs.
"""
