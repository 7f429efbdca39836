"""Evaluation inside a run: the teacher once (its accuracy goes into the
checkpoint's metadata), the student at every epoch end, on the real test split
(every host scores its share: `distill.evaluate_on_hosts`)."""

import time
from typing import Any, Dict

from cmi_jax import data, distill
from cmi_jax.teacher import Teacher


def teacher_accuracy(cfg, teacher: Teacher, info: data.DatasetInfo, test: data.Split) -> float:
  """Top-1 % of the teacher on the test split (printed)."""
  acc = distill.evaluate_on_hosts(
      distill.make_eval_fn(teacher.module, info.mean, info.std), teacher.variables,
      test.images, test.labels, cfg.data.eval_batch_size)['accuracy']
  print(f'Teacher accuracy on the {cfg.data.name} test split: {acc:.2f}%')
  return acc


def student_row(cfg, eval_fn, student_state: Any, test: data.Split) -> Dict[str, float]:
  """The student's test accuracy (%), mean CE and the seconds it took (eval_s lies
  inside the round's elapsed_s; time-to-accuracy subtracts it)."""
  t_eval = time.time()
  ev = distill.evaluate_on_hosts(eval_fn, {'params': student_state.params,
                                           'batch_stats': student_state.batch_stats},
                                 test.images, test.labels, cfg.data.eval_batch_size)
  return {'student_accuracy': ev['accuracy'], 'student_test_loss': ev['loss'],
          'eval_s': time.time() - t_eval}
