"""Every figure names its machine: what machine.py reads and prints."""

from vitjax import machine

ZEN4 = {
    'model name': 'AMD EPYC',
    'cpu family': '25',
    'model': '17',
    'flags': 'fpu sse2 avx2 fma avx512f avx512bw avx512_bf16 vaes',
}


def test_the_cpu_is_named_with_its_family_and_features(monkeypatch):
  monkeypatch.setattr(machine, '_cpuinfo', lambda: ZEN4)
  m = machine.describe()
  assert m['cpu'] == 'AMD EPYC' and m['cpu_family_model'] == '25/17'
  assert m['cpu_features'] == ['avx2', 'avx512f', 'avx512_bf16']
  assert m['accelerator'] == 'none'  # the tests run on CPU devices
  assert m['cpu_cores'] >= 1 and m['jax'] and m['jaxlib']
  assert machine.summary(m).startswith(
      'AMD EPYC (family/model 25/17), '
      f'{m["cpu_cores"]} cores, avx2 avx512f avx512_bf16; no accelerator; jax '
  )


def test_a_cpu_without_avx2_or_cpuinfo_is_still_described(monkeypatch):
  monkeypatch.setattr(machine, '_cpuinfo', dict)
  m = machine.describe()
  assert m['cpu_features'] == [] and m['cpu_family_model'] == ''
  assert 'no AVX2' in machine.summary(m)
